//! The NBD wire protocol as a pure codec: no sockets, no allocation driven
//! by an unchecked length. Every number is big-endian ("network byte
//! order"), names and values follow `NetworkBlockDevice/nbd` `doc/proto.md`.
//!
//! Bounds, checked **before** anything is allocated:
//! - option data: at most [`MAX_OPTION_DATA`] bytes ([`check_option_length`]);
//! - strings (export names, meta-context queries): at most [`MAX_STRING`];
//! - write payloads: at most [`MAX_PAYLOAD`] ([`check_payload`]).
#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after `NBDMAGIC` in the greeting, and before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Largest option payload we read (the reference server uses the same order).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option payloads up to this size are read and discarded with
/// `NBD_REP_ERR_TOO_BIG`; larger ones are a denial of service: drop.
pub const MAX_OPTION_DISCARD: u32 = 16 * 1024 * 1024;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Largest READ/WRITE payload we accept (32 MiB, what every client assumes).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Over-long WRITE payloads up to this size are read and discarded so the
/// stream stays in sync; longer ones drop the connection.
pub const MAX_DISCARD_PAYLOAD: u32 = 256 * 1024 * 1024;
/// The minimum block size we advertise.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of the greeting the server sends first.
pub const GREETING_LEN: usize = 18;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Handshake flags (server → client, u16).
pub mod handshake {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
    /// Client flags (client → server, u32).
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_PLATFORM: u32 = ERR | 4;
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// True for the error reply types (bit 31).
    pub fn is_error(t: u32) -> bool {
        t & ERR != 0
    }
}

/// Information types in `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (u16, sent with the export).
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error numbers on the wire (`NBD_E*`). They are not the host's errno.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// The wire error for a host errno; unknown ones become `EIO`.
    pub fn from_host(e: i32) -> u32 {
        match e {
            libc::EPERM => EPERM,
            libc::EIO => EIO,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::EOPNOTSUPP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        }
    }
}

/// A violation of the protocol that ends the connection (there is no
/// error channel for it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic: expected {expected:#x}, got {found:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option data of {0} bytes is beyond any sane limit")]
    OptionTooLong(u32),
    #[error("write payload of {0} bytes is beyond any sane limit")]
    PayloadTooLong(u32),
}

/// Why an option's data was refused; answered with `NBD_REP_ERR_INVALID`
/// (and the message) while the connection carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionInvalid(pub &'static str);

/// Big-endian reader over a byte slice; every read is bounds-checked.
struct Wire<'a> {
    buf: &'a [u8],
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Wire { buf }
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    let (magic, rest) = b.split_at_mut(8);
    magic.copy_from_slice(&NBDMAGIC.to_be_bytes());
    let (opt, fl) = rest.split_at_mut(8);
    opt.copy_from_slice(&IHAVEOPT.to_be_bytes());
    fl.copy_from_slice(&flags.to_be_bytes());
    b
}

/// Client flags as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parse the client flags; unknown bits (or `NO_ZEROES` when the server did
/// not offer it) must drop the connection.
pub fn parse_client_flags(b: [u8; 4], server_flags: u16) -> Result<ClientFlags, ProtoError> {
    let f = u32::from_be_bytes(b);
    let mut known = handshake::C_FIXED_NEWSTYLE;
    if server_flags & handshake::NO_ZEROES != 0 {
        known |= handshake::C_NO_ZEROES;
    }
    if f & !known != 0 {
        return Err(ProtoError::UnknownClientFlags(f));
    }
    Ok(ClientFlags {
        fixed_newstyle: f & handshake::C_FIXED_NEWSTYLE != 0,
        no_zeroes: f & handshake::C_NO_ZEROES != 0,
    })
}

/// An option header: `IHAVEOPT`, option number, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut w = Wire::new(b);
    let (magic, option, length) = match (w.u64(), w.u32(), w.u32()) {
        (Some(m), Some(o), Some(l)) => (m, o, l),
        _ => unreachable!("16 bytes hold a u64 and two u32"),
    };
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader { option, length })
}

pub fn encode_option_header(h: OptionHeader) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN);
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&h.option.to_be_bytes());
    v.extend_from_slice(&h.length.to_be_bytes());
    out.copy_from_slice(&v);
    out
}

/// What to do with an option of `length` bytes, decided before reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionLength {
    /// Read it (at most [`MAX_OPTION_DATA`] bytes).
    Read,
    /// Read and discard it, then answer `NBD_REP_ERR_TOO_BIG`.
    Discard,
}

pub fn check_option_length(length: u32) -> Result<OptionLength, ProtoError> {
    if length <= MAX_OPTION_DATA {
        Ok(OptionLength::Read)
    } else if length <= MAX_OPTION_DISCARD {
        Ok(OptionLength::Discard)
    } else {
        Err(ProtoError::OptionTooLong(length))
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types (unknown ones are ignored by the server).
    pub requests: Vec<u16>,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Anything else (PEEK_EXPORT, EXTENDED_HEADERS, unknown): `ERR_UNSUP`.
    Other(u32),
}

fn string(bytes: &[u8]) -> Result<String, OptionInvalid> {
    if bytes.len() > MAX_STRING {
        return Err(OptionInvalid("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(OptionInvalid("string contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionInvalid("string is not UTF-8"))
}

fn prefixed_string(w: &mut Wire<'_>) -> Result<String, OptionInvalid> {
    let len = w.u32().ok_or(OptionInvalid("truncated string length"))?;
    // Bound before touching the bytes; `bytes` also checks against the data.
    if len as usize > MAX_STRING {
        return Err(OptionInvalid("string longer than 4096 bytes"));
    }
    let b = w
        .bytes(len as usize)
        .ok_or(OptionInvalid("string beyond option data"))?;
    string(b)
}

fn parse_info(data: &[u8]) -> Result<InfoRequest, OptionInvalid> {
    let mut w = Wire::new(data);
    let name = prefixed_string(&mut w)?;
    let n = w
        .u16()
        .ok_or(OptionInvalid("truncated info request count"))?;
    if w.remaining() != usize::from(n) * 2 {
        return Err(OptionInvalid("info request count does not match length"));
    }
    let mut requests = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        requests.push(w.u16().ok_or(OptionInvalid("truncated info request"))?);
    }
    Ok(InfoRequest { name, requests })
}

fn parse_meta_context(data: &[u8]) -> Result<MetaContextRequest, OptionInvalid> {
    let mut w = Wire::new(data);
    let name = prefixed_string(&mut w)?;
    let n = w.u32().ok_or(OptionInvalid("truncated query count"))?;
    // Each query takes at least 4 bytes: bound the count by the data.
    if n as usize > w.remaining() / 4 {
        return Err(OptionInvalid("query count beyond option data"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(prefixed_string(&mut w)?);
    }
    if !w.is_empty() {
        return Err(OptionInvalid("trailing bytes after queries"));
    }
    Ok(MetaContextRequest { name, queries })
}

fn no_data(data: &[u8]) -> Result<(), OptionInvalid> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(OptionInvalid("option takes no data"))
    }
}

/// Parse option `option` with its `data` (already bounded by
/// [`check_option_length`]).
pub fn parse_option(option: u32, data: &[u8]) -> Result<NbdOption, OptionInvalid> {
    Ok(match option {
        opt::EXPORT_NAME => NbdOption::ExportName(string(data)?),
        opt::ABORT => NbdOption::Abort, // data "SHOULD" be empty: ignore it
        opt::LIST => {
            no_data(data)?;
            NbdOption::List
        }
        opt::STARTTLS => {
            no_data(data)?;
            NbdOption::StartTls
        }
        opt::INFO => NbdOption::Info(parse_info(data)?),
        opt::GO => NbdOption::Go(parse_info(data)?),
        opt::STRUCTURED_REPLY => {
            no_data(data)?;
            NbdOption::StructuredReply
        }
        opt::LIST_META_CONTEXT => NbdOption::ListMetaContext(parse_meta_context(data)?),
        opt::SET_META_CONTEXT => NbdOption::SetMetaContext(parse_meta_context(data)?),
        other => NbdOption::Other(other),
    })
}

/// Append an option reply (header and data) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Append an error reply with a message (cut to [`MAX_STRING`] bytes).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, msg: &str) {
    let mut end = msg.len().min(MAX_STRING);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = msg.get(..end).unwrap_or("");
    encode_option_reply(out, option, reply_type, msg.as_bytes());
}

/// A human-readable string cut to the spec's bound (4096 bytes) at a
/// character boundary.
fn bounded_text(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// `NBD_REP_SERVER` for `NBD_OPT_LIST`: the name, then its description
/// (the rest of the reply, as the spec allows).
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: Option<&str>) {
    let desc = bounded_text(description.unwrap_or(""));
    let mut data = Vec::with_capacity(4 + name.len() + desc.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(desc.as_bytes());
    encode_option_reply(out, opt::LIST, rep::SERVER, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
pub fn encode_info_description(out: &mut Vec<u8>, option: u32, text: &str) {
    let text = bounded_text(text);
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, rep::INFO, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, rep::INFO, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn encode_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut data = Vec::with_capacity(2 + name.len());
    data.extend_from_slice(&info::NAME.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, rep::INFO, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(
    out: &mut Vec<u8>,
    option: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
) {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&minimum.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&maximum.to_be_bytes());
    encode_option_reply(out, option, rep::INFO, &data);
}

/// `NBD_REP_META_CONTEXT`: a context id and its name (for
/// `NBD_OPT_LIST_META_CONTEXT` the id is 0).
pub fn encode_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, rep::META_CONTEXT, &data);
}

/// Length of one block-status descriptor (u32 length, u32 flags).
pub const BLOCK_DESCRIPTOR_LEN: usize = 8;

/// Append an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for context `context_id`
/// with descriptors `(length, flags)`.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    descriptors: &[(u32, u32)],
    done: bool,
) {
    let len = 4 + descriptors.len() * BLOCK_DESCRIPTOR_LEN;
    let h = ChunkHeader {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        chunk_type: chunk::BLOCK_STATUS,
        cookie,
        length: u32::try_from(len).unwrap_or(u32::MAX),
    };
    out.reserve(CHUNK_HEADER_LEN + len);
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(l, f) in descriptors {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Parse the payload of a `BLOCK_STATUS` chunk (clients and tests): the
/// context id and the descriptors. `None` when the length is not
/// 4 + 8·n.
pub fn parse_block_status(payload: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    let mut w = Wire::new(payload);
    let id = w.u32()?;
    if w.remaining() % BLOCK_DESCRIPTOR_LEN != 0 {
        return None;
    }
    let mut v = Vec::with_capacity(w.remaining() / BLOCK_DESCRIPTOR_LEN);
    while !w.is_empty() {
        v.push((w.u32()?, w.u32()?));
    }
    Some((id, v))
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags, 124 zeroes unless
/// `NO_ZEROES` was negotiated.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A parsed option reply header (for clients and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader, ProtoError> {
    let mut w = Wire::new(b);
    let (magic, option, reply_type, length) = match (w.u64(), w.u32(), w.u32(), w.u32()) {
        (Some(m), Some(o), Some(t), Some(l)) => (m, o, t, l),
        _ => unreachable!("20 bytes hold a u64 and three u32"),
    };
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option,
        reply_type,
        length,
    })
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let mut w = Wire::new(b);
    let fields = (w.u32(), w.u16(), w.u16(), w.u64(), w.u64(), w.u32());
    let (Some(magic), Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) =
        fields
    else {
        unreachable!("28 bytes hold a request header")
    };
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut v = Vec::with_capacity(REQUEST_LEN);
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.extend_from_slice(&self.command.to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.length.to_be_bytes());
        let mut out = [0u8; REQUEST_LEN];
        out.copy_from_slice(&v);
        out
    }
}

/// What to do with a WRITE payload of `length` bytes, decided before reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadCheck {
    /// Within [`MAX_PAYLOAD`]: read it into a buffer.
    Accept,
    /// Too long to serve: read and throw away in small pieces, answer EINVAL.
    Discard,
}

pub fn check_payload(length: u32) -> Result<PayloadCheck, ProtoError> {
    if length <= MAX_PAYLOAD {
        Ok(PayloadCheck::Accept)
    } else if length <= MAX_DISCARD_PAYLOAD {
        Ok(PayloadCheck::Discard)
    } else {
        Err(ProtoError::PayloadTooLong(length))
    }
}

/// A simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A parsed simple reply header (for clients and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn parse_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, ProtoError> {
    let mut w = Wire::new(b);
    let (Some(magic), Some(error), Some(cookie)) = (w.u32(), w.u32(), w.u64()) else {
        unreachable!("16 bytes hold a simple reply")
    };
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(SimpleReply { error, cookie })
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.chunk_type.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

pub fn parse_chunk_header(b: &[u8; CHUNK_HEADER_LEN]) -> Result<ChunkHeader, ProtoError> {
    let mut w = Wire::new(b);
    let (Some(magic), Some(flags), Some(chunk_type), Some(cookie), Some(length)) =
        (w.u32(), w.u16(), w.u16(), w.u64(), w.u32())
    else {
        unreachable!("20 bytes hold a chunk header")
    };
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(STRUCTURED_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(ChunkHeader {
        flags,
        chunk_type,
        cookie,
        length,
    })
}

/// Header of an `OFFSET_DATA` chunk carrying `data_len` bytes read at
/// `offset` (the data follows): chunk header + u64 offset.
pub fn encode_offset_data_header(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> [u8; CHUNK_HEADER_LEN + 8] {
    let h = ChunkHeader {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        chunk_type: chunk::OFFSET_DATA,
        cookie,
        length: data_len.saturating_add(8),
    };
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&h.encode());
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A `NONE` chunk (always DONE): a successful reply with no data.
pub fn encode_none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        chunk_type: chunk::NONE,
        cookie,
        length: 0,
    }
    .encode()
}

/// Append an `ERROR` chunk (or `ERROR_OFFSET` when `offset` is given).
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    error: u32,
    offset: Option<u64>,
    msg: &str,
    done: bool,
) {
    let mut end = msg.len().min(MAX_STRING);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = msg.get(..end).unwrap_or("").as_bytes();
    let extra = if offset.is_some() { 8 } else { 0 };
    let h = ChunkHeader {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        chunk_type: if offset.is_some() {
            chunk::ERROR_OFFSET
        } else {
            chunk::ERROR
        },
        cookie,
        length: (6 + msg.len() + extra) as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(o) = offset {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
