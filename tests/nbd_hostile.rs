//! The NBD server against a raw-socket client that breaks the rules: bad
//! magic, unknown flags, absurd lengths, unknown exports and commands,
//! out-of-range requests, clients vanishing mid-payload, connection floods.
//! After each abuse the server must answer as the spec says and keep
//! serving; memory must stay bounded whatever lengths the client claims.
//!
//! Tests in this file run one at a time (they measure the process's RSS).

use dmsnap::device::{DevError, Device, PlainDevice, StaticExports};
use dmsnap::export::nbd::proto::{
    self, chunk, cmd, cmd_flags, errno, handshake, info, opt, rep, tflags, Request,
};
use dmsnap::export::nbd::{Listen, NbdServer, ServerOptions};
use dmsnap::io::MemDev;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A device whose reads fail with EIO from `offset` on, and which can be
/// "removed" (then every call answers `DevError::Gone`).
struct Flaky {
    inner: PlainDevice<MemDev>,
    bad_from: u64,
    gone: AtomicBool,
}

impl Device for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(DevError::Gone);
        }
        if offset + buf.len() as u64 > self.bad_from {
            return Err(DevError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(DevError::Gone);
        }
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DevError> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(DevError::Gone);
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.inner.write_zeroes(offset, len, fua)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    server: NbdServer,
    origin: Arc<PlainDevice<MemDev>>,
    flaky: Arc<Flaky>,
}

fn fixture_with(opts: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let origin = Arc::new(PlainDevice::new(MemDev::new(SIZE), false));
    let flaky = Arc::new(Flaky {
        inner: PlainDevice::new(MemDev::new(MIB), false),
        bad_from: MIB / 2,
        gone: AtomicBool::new(false),
    });
    let exports = StaticExports::new()
        .with("origin", origin.clone())
        .with("flaky", flaky.clone())
        .with(
            "ro",
            Arc::new(PlainDevice::new(MemDev::new(MIB), true)) as Arc<dyn Device>,
        );
    let server = NbdServer::new(Arc::new(exports), opts);
    server.listen(&Listen::Unix(sock.clone())).unwrap();
    Fixture {
        _dir: dir,
        sock,
        server,
        origin,
        flaky,
    }
}

fn fixture() -> Fixture {
    fixture_with(ServerOptions::default())
}

/// A hand-driven client.
struct Raw {
    s: UnixStream,
}

struct OptReply {
    reply_type: u32,
    data: Vec<u8>,
}

impl Raw {
    fn connect(f: &Fixture) -> Raw {
        let s = UnixStream::connect(&f.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s }
    }
    /// Read the greeting and send client flags.
    fn hello(f: &Fixture, client_flags: u32) -> Raw {
        let mut r = Raw::connect(f);
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags, handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
        r.s.write_all(&client_flags.to_be_bytes()).unwrap();
        r
    }
    fn fixed(f: &Fixture) -> Raw {
        Raw::hello(f, handshake::C_FIXED_NEWSTYLE | handshake::C_NO_ZEROES)
    }
    fn send_option(&mut self, option: u32, data: &[u8]) {
        let h = proto::encode_option_header(proto::OptionHeader {
            option,
            length: data.len() as u32,
        });
        self.s.write_all(&h).unwrap();
        self.s.write_all(data).unwrap();
    }
    fn opt_reply(&mut self, option: u32) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let h = proto::parse_option_reply_header(&h).unwrap();
        assert_eq!(h.option, option);
        assert!(h.length <= 64 * 1024);
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data).unwrap();
        OptReply {
            reply_type: h.reply_type,
            data,
        }
    }
    fn info_data(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }
    /// INFO or GO; `Ok((size, flags))` on ACK, `Err(reply type)` on error.
    fn info_go(&mut self, option: u32, name: &str) -> Result<(u64, u16), u32> {
        self.send_option(
            option,
            &Raw::info_data(name.as_bytes(), &[info::BLOCK_SIZE]),
        );
        let mut export = None;
        loop {
            let r = self.opt_reply(option);
            match r.reply_type {
                rep::ACK => return Ok(export.expect("INFO_EXPORT before ACK")),
                rep::INFO => {
                    let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if t == info::EXPORT {
                        assert_eq!(r.data.len(), 12);
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        export = Some((size, flags));
                    } else if t == info::BLOCK_SIZE {
                        assert_eq!(r.data.len(), 14);
                        let min = u32::from_be_bytes(r.data[2..6].try_into().unwrap());
                        let max = u32::from_be_bytes(r.data[10..14].try_into().unwrap());
                        assert_eq!((min, max), (512, 32 << 20));
                    }
                }
                t if rep::is_error(t) => return Err(t),
                t => panic!("unexpected reply type {t:#x}"),
            }
        }
    }
    /// A connection in transmission on `name`.
    fn go(f: &Fixture, name: &str) -> Raw {
        let mut r = Raw::fixed(f);
        r.info_go(opt::GO, name).unwrap();
        r
    }
    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&req.encode()).unwrap();
    }
    fn reply(&mut self) -> proto::SimpleReply {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        proto::parse_simple_reply(&h).unwrap()
    }
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.request(cmd::WRITE, flags, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r.error
    }
    /// A simple-reply READ: `Ok(data)` or `Err(error)`.
    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(cmd::READ, 0, cookie, offset, len);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        if r.error != 0 {
            return Err(r.error);
        }
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        Ok(d)
    }
    fn simple(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> u32 {
        self.request(command, flags, cookie, offset, len);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r.error
    }
    /// True when the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        }
    }
}

/// A fresh, well-behaved client still gets correct data.
fn assert_serving(f: &Fixture) {
    let mut c = Raw::go(f, "origin");
    let got = c.read(1, 0, 4096).unwrap();
    let mut want = vec![0u8; 4096];
    f.origin.read_at(&mut want, 0).unwrap();
    assert_eq!(got, want);
}

#[test]
fn bad_magic_drops_the_connection() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::fixed(&f);
    let mut h = proto::encode_option_header(proto::OptionHeader {
        option: opt::LIST,
        length: 0,
    });
    h[0] = b'X';
    c.s.write_all(&h).unwrap();
    assert!(c.closed());
    // bad request magic in transmission
    let mut c = Raw::go(&f, "origin");
    let mut req = Request {
        flags: 0,
        command: cmd::READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    req[1] = 0;
    c.s.write_all(&req).unwrap();
    assert!(c.closed());
    assert_serving(&f);
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::hello(&f, 1 << 7 | handshake::C_FIXED_NEWSTYLE);
    assert!(c.closed());
    assert_serving(&f);
}

#[test]
fn option_length_4gib_drops_and_1mib_is_too_big() {
    let _g = serial();
    let f = fixture();
    let before = rss();
    let mut c = Raw::fixed(&f);
    let h = proto::encode_option_header(proto::OptionHeader {
        option: opt::GO,
        length: u32::MAX,
    });
    c.s.write_all(&h).unwrap();
    assert!(c.closed());
    // 1 MiB of option data: read and thrown away, ERR_TOO_BIG, still in sync.
    let mut c = Raw::fixed(&f);
    c.send_option(opt::GO, &vec![7u8; MIB as usize]);
    assert_eq!(c.opt_reply(opt::GO).reply_type, rep::ERR_TOO_BIG);
    assert_eq!(c.info_go(opt::GO, "origin").map(|x| x.0), Ok(SIZE));
    assert!(c.read(1, 0, 512).is_ok());
    assert!(rss() < before + 32 * MIB, "option lengths allocated memory");
}

#[test]
fn export_name_too_long() {
    let _g = serial();
    let f = fixture();
    let long = "x".repeat(5000);
    let mut c = Raw::fixed(&f);
    c.send_option(opt::GO, &Raw::info_data(long.as_bytes(), &[]));
    assert_eq!(c.opt_reply(opt::GO).reply_type, rep::ERR_INVALID);
    // the name length field claims more than the data holds
    let mut d = 60_000u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"origin\0\0");
    c.send_option(opt::INFO, &d);
    assert_eq!(c.opt_reply(opt::INFO).reply_type, rep::ERR_INVALID);
    assert!(c.info_go(opt::GO, "origin").is_ok());
    // EXPORT_NAME has no error reply: the server closes.
    let mut c = Raw::fixed(&f);
    c.send_option(opt::EXPORT_NAME, long.as_bytes());
    assert!(c.closed());
    assert_serving(&f);
}

#[test]
fn go_for_unknown_export_then_a_good_one() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::fixed(&f);
    assert_eq!(c.info_go(opt::GO, "nope"), Err(rep::ERR_UNKNOWN));
    assert_eq!(c.info_go(opt::INFO, "nope"), Err(rep::ERR_UNKNOWN));
    let (size, flags) = c.info_go(opt::INFO, "ro").unwrap();
    assert_eq!(size, MIB);
    assert_ne!(flags & tflags::READ_ONLY, 0);
    let (size, flags) = c.info_go(opt::GO, "origin").unwrap();
    assert_eq!(size, SIZE);
    for want in [
        tflags::HAS_FLAGS,
        tflags::SEND_FLUSH,
        tflags::SEND_FUA,
        tflags::SEND_TRIM,
        tflags::SEND_WRITE_ZEROES,
        tflags::CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & want, 0, "flag {want:#x}");
    }
    assert_eq!(
        flags & (tflags::READ_ONLY | tflags::SEND_FAST_ZERO | tflags::SEND_DF),
        0
    );
    assert_eq!(c.write(1, 0, &[9u8; 4096], 0), 0);
    assert_eq!(c.read(2, 0, 4096).unwrap(), vec![9u8; 4096]);
}

#[test]
fn unsupported_options_keep_the_connection() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::fixed(&f);
    c.send_option(opt::STARTTLS, &[]);
    assert_eq!(c.opt_reply(opt::STARTTLS).reply_type, rep::ERR_UNSUP);
    c.send_option(12345, &[1, 2, 3]);
    assert_eq!(c.opt_reply(12345).reply_type, rep::ERR_UNSUP);
    c.send_option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(
        c.opt_reply(opt::EXTENDED_HEADERS).reply_type,
        rep::ERR_UNSUP
    );
    let mut q = 6u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"origin");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&15u32.to_be_bytes());
    q.extend_from_slice(b"base:allocation");
    // Meta contexts need structured replies first (tests/block_status_clients.rs).
    c.send_option(opt::SET_META_CONTEXT, &q);
    assert_eq!(
        c.opt_reply(opt::SET_META_CONTEXT).reply_type,
        rep::ERR_INVALID
    );
    c.send_option(opt::LIST, &[1]);
    assert_eq!(c.opt_reply(opt::LIST).reply_type, rep::ERR_INVALID);
    // LIST: one SERVER per export, then ACK.
    c.send_option(opt::LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply(opt::LIST);
        if r.reply_type == rep::ACK {
            break;
        }
        assert_eq!(r.reply_type, rep::SERVER);
        let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["flaky", "origin", "ro"]);
    // STRUCTURED_REPLY twice: the second is refused.
    c.send_option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply(opt::STRUCTURED_REPLY).reply_type, rep::ACK);
    c.send_option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.opt_reply(opt::STRUCTURED_REPLY).reply_type,
        rep::ERR_INVALID
    );
    // ABORT: ACK, then the server closes.
    c.send_option(opt::ABORT, &[]);
    assert_eq!(c.opt_reply(opt::ABORT).reply_type, rep::ACK);
    assert!(c.closed());
}

#[test]
fn legacy_export_name() {
    let _g = serial();
    let f = fixture();
    for (cflags, zeroes) in [
        (handshake::C_FIXED_NEWSTYLE | handshake::C_NO_ZEROES, 0),
        (handshake::C_FIXED_NEWSTYLE, 124),
        (0, 124),
    ] {
        let mut c = Raw::hello(&f, cflags);
        c.send_option(opt::EXPORT_NAME, b"origin");
        let mut b = vec![0u8; 10 + zeroes];
        c.s.read_exact(&mut b).unwrap();
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
        assert!(b[10..].iter().all(|&x| x == 0));
        assert!(c.read(1, 0, 512).is_ok());
    }
    let mut c = Raw::fixed(&f);
    c.send_option(opt::EXPORT_NAME, b"nope");
    assert!(c.closed());
}

#[test]
fn out_of_range_requests_get_errors_and_the_stream_stays_usable() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::go(&f, "origin");
    assert_eq!(c.read(1, SIZE - 512, 1024), Err(errno::EINVAL));
    assert_eq!(c.read(2, u64::MAX - 10, 512), Err(errno::EINVAL));
    assert_eq!(c.write(3, SIZE - 512, &[1u8; 1024], 0), errno::ENOSPC);
    assert_eq!(c.write(4, u64::MAX, &[1u8; 512], 0), errno::ENOSPC);
    assert_eq!(c.simple(cmd::TRIM, 0, 5, SIZE, 512), errno::EINVAL);
    assert_eq!(
        c.simple(cmd::WRITE_ZEROES, 0, 6, SIZE - 1, 2),
        errno::ENOSPC
    );
    assert_eq!(c.simple(cmd::CACHE, 0, 7, SIZE, 1), errno::EINVAL);
    // the device was not touched and the connection is still in sync
    assert_eq!(c.write(8, SIZE - 512, &[2u8; 512], cmd_flags::FUA), 0);
    assert_eq!(c.read(9, SIZE - 512, 512).unwrap(), vec![2u8; 512]);
    assert_eq!(c.simple(cmd::FLUSH, 0, 10, 0, 0), 0);
    assert_eq!(c.simple(cmd::TRIM, 0, 11, 0, 4096), 0);
    assert_eq!(
        c.simple(
            cmd::WRITE_ZEROES,
            cmd_flags::NO_HOLE | cmd_flags::FUA,
            12,
            SIZE - 512,
            512
        ),
        0
    );
    assert_eq!(c.read(13, SIZE - 512, 512).unwrap(), vec![0u8; 512]);
    assert_eq!(c.simple(cmd::CACHE, 0, 14, 0, 4096), 0);
    // read-only export: writes are EPERM, reads fine
    let mut c = Raw::go(&f, "ro");
    assert_eq!(c.write(1, 0, &[1u8; 512], 0), errno::EPERM);
    assert_eq!(c.simple(cmd::TRIM, 0, 2, 0, 512), errno::EPERM);
    assert_eq!(c.simple(cmd::WRITE_ZEROES, 0, 3, 0, 512), errno::EPERM);
    assert_eq!(c.read(4, 0, 512).unwrap(), vec![0u8; 512]);
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::go(&f, "origin");
    assert_eq!(c.simple(99, 0, 1, 0, 0), errno::EINVAL);
    assert_eq!(c.simple(cmd::BLOCK_STATUS, 0, 2, 0, 4096), errno::EINVAL);
    // unknown flag on a write: EINVAL, payload consumed, data not written
    assert_eq!(c.write(3, 0, &[5u8; 4096], 1 << 9), errno::EINVAL);
    assert_eq!(
        c.write(4, 0, &[5u8; 4096], cmd_flags::NO_HOLE),
        errno::EINVAL
    );
    assert_eq!(
        c.simple(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 5, 0, 512),
        errno::EINVAL
    );
    assert_eq!(c.read(6, 0, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn huge_lengths_never_allocate() {
    let _g = serial();
    let f = fixture();
    let before = rss();
    // READ of 1 GiB: EINVAL, nothing allocated, stream in sync.
    let mut c = Raw::go(&f, "origin");
    assert_eq!(c.read(1, 0, 1 << 30), Err(errno::EINVAL));
    assert!(c.read(2, 0, 512).is_ok());
    // WRITE of 100 MiB: above the 32 MiB maximum; the payload is read and
    // discarded, EINVAL, and the stream stays in sync.
    let payload = vec![3u8; 100 * MIB as usize];
    assert_eq!(c.write(3, 0, &payload, 0), errno::EINVAL);
    drop(payload);
    assert_eq!(c.read(4, 0, 512).unwrap(), vec![0u8; 512]);
    // WRITE of 1 GiB: the server hangs up instead of reading it.
    c.request(cmd::WRITE, 0, 5, 0, 1 << 30);
    let chunk = vec![4u8; MIB as usize];
    let mut sent = 0u64;
    while sent < 1 << 30 {
        if c.s.write_all(&chunk).is_err() {
            break;
        }
        sent += MIB;
    }
    assert!(sent < 1 << 30, "server swallowed a 1 GiB write");
    assert!(c.closed());
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 * MIB, "RSS grew by {grown} bytes");
    assert_serving(&f);
    assert!(f
        .origin
        .inner()
        .snapshot()
        .iter()
        .take(4096)
        .all(|&b| b == 0));
}

#[test]
fn in_flight_bytes_are_bounded_for_a_client_that_does_not_read() {
    let _g = serial();
    // Enough workers that only the in-flight byte limit can hold memory back.
    let f = fixture_with(ServerOptions {
        workers_per_connection: 16,
        ..ServerOptions::default()
    });
    let before = rss();
    let mut c = Raw::go(&f, "origin");
    // 20 reads of 32 MiB (640 MiB of replies) sent at once, replies unread.
    for i in 0..20 {
        c.request(cmd::READ, 0, i, 0, 32 << 20);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss().saturating_sub(before);
    assert!(grown < 160 * MIB, "RSS grew by {grown} bytes");
    // Now read them all: every reply is complete and correct.
    let mut buf = vec![0u8; 32 << 20];
    for _ in 0..20 {
        let r = c.reply();
        assert_eq!(r.error, 0);
        c.s.read_exact(&mut buf).unwrap();
    }
    assert!(c.read(100, 0, 512).is_ok());
}

#[test]
fn pipelined_requests_complete_out_of_order_safely() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::go(&f, "origin");
    // 64 writes of distinct blocks without waiting, then all replies.
    for i in 0..64u64 {
        let data = vec![i as u8 + 1; 65536];
        c.request(cmd::WRITE, 0, 1000 + i, i * 65536, 65536);
        c.s.write_all(&data).unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let r = c.reply();
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.cookie));
    }
    assert_eq!(seen, (1000..1064).collect());
    // 64 pipelined reads, each reply carries its own block.
    for i in 0..64u64 {
        c.request(cmd::READ, 0, i, i * 65536, 65536);
    }
    let mut d = vec![0u8; 65536];
    for _ in 0..64 {
        let r = c.reply();
        assert_eq!(r.error, 0);
        c.s.read_exact(&mut d).unwrap();
        assert!(
            d.iter().all(|&b| b == r.cookie as u8 + 1),
            "cookie {}",
            r.cookie
        );
    }
}

#[test]
fn structured_replies_for_reads() {
    let _g = serial();
    let f = fixture();
    f.origin.write_at(&[0x42; 4096], 8192, false).unwrap();
    let mut c = Raw::fixed(&f);
    c.send_option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply(opt::STRUCTURED_REPLY).reply_type, rep::ACK);
    c.info_go(opt::GO, "flaky").unwrap();
    let chunk_header = |c: &mut Raw| {
        let mut h = [0u8; proto::CHUNK_HEADER_LEN];
        c.s.read_exact(&mut h).unwrap();
        proto::parse_chunk_header(&h).unwrap()
    };
    // success: one OFFSET_DATA chunk, DONE
    c.request(cmd::READ, 0, 7, 0, 4096);
    let h = chunk_header(&mut c);
    assert_eq!(
        (h.flags, h.chunk_type, h.cookie, h.length),
        (chunk::FLAG_DONE, chunk::OFFSET_DATA, 7, 4104)
    );
    let mut d = vec![0u8; 4104];
    c.s.read_exact(&mut d).unwrap();
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 0);
    // device read error (EIO) and out of range (EINVAL): ERROR chunks, DONE
    for (cookie, offset, want) in [(8, MIB - 4096, errno::EIO), (9, MIB, errno::EINVAL)] {
        c.request(cmd::READ, 0, cookie, offset, 4096);
        let h = chunk_header(&mut c);
        assert_eq!(
            (h.flags, h.chunk_type, h.cookie),
            (chunk::FLAG_DONE, chunk::ERROR, cookie)
        );
        let mut d = vec![0u8; h.length as usize];
        c.s.read_exact(&mut d).unwrap();
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), want);
        let msg_len = u16::from_be_bytes([d[4], d[5]]) as usize;
        assert_eq!(msg_len + 6, d.len());
    }
    // non-READ replies may stay simple
    assert_eq!(c.write(10, 0, &[1u8; 512], 0), 0);
}

#[test]
fn device_errors_and_removed_devices_answer_errors() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::go(&f, "flaky");
    // simple reply: the read is done before the header, so EIO is clean
    assert_eq!(c.read(1, MIB - 4096, 4096), Err(errno::EIO));
    assert!(c.read(2, 0, 4096).is_ok());
    f.flaky.gone.store(true, Ordering::SeqCst);
    assert_eq!(c.read(3, 0, 4096), Err(errno::EIO));
    assert_eq!(c.write(4, 0, &[1; 512], 0), errno::EIO);
    assert_eq!(c.simple(cmd::FLUSH, 0, 5, 0, 0), errno::EIO);
    f.flaky.gone.store(false, Ordering::SeqCst);
    assert!(c.read(6, 0, 4096).is_ok());
    assert_serving(&f);
}

#[test]
fn disconnect_mid_payload_costs_only_that_connection() {
    let _g = serial();
    let f = fixture();
    let mut other = Raw::go(&f, "origin");
    assert_eq!(other.write(1, 0, &[7u8; 4096], 0), 0);
    for _ in 0..10 {
        let mut c = Raw::go(&f, "origin");
        c.request(cmd::WRITE, 0, 1, 0, MIB as u32);
        c.s.write_all(&[0xee; 1000]).unwrap();
        drop(c);
        // mid-handshake too
        let mut c = Raw::fixed(&f);
        let h = proto::encode_option_header(proto::OptionHeader {
            option: opt::GO,
            length: 100,
        });
        c.s.write_all(&h).unwrap();
        c.s.write_all(&[0; 10]).unwrap();
    }
    assert_eq!(other.read(2, 0, 4096).unwrap(), vec![7u8; 4096]);
    assert_serving(&f);
}

#[test]
fn three_hundred_connections_opened_and_dropped() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::go(&f, "origin");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(1, MIB, &data, cmd_flags::FUA), 0);
    drop(c);
    let mut held = Vec::new();
    for i in 0..300 {
        match i % 3 {
            0 => held.push(Raw::connect(&f)),
            1 => held.push(Raw::fixed(&f)),
            _ => {
                let mut c = Raw::go(&f, "origin");
                c.request(cmd::READ, 0, 1, 0, 4096); // reply never read
                held.push(c);
            }
        }
    }
    assert!(f.server.connections() >= 290, "{}", f.server.connections());
    drop(held);
    let t0 = Instant::now();
    while f.server.connections() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "connections not reaped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Raw::go(&f, "origin");
    assert_eq!(c.read(2, MIB, 65536).unwrap(), data);
}

#[test]
fn connections_beyond_the_limit_are_refused_cleanly() {
    let _g = serial();
    let f = fixture_with(ServerOptions {
        max_connections: 4,
        ..ServerOptions::default()
    });
    let held: Vec<Raw> = (0..4).map(|_| Raw::go(&f, "origin")).collect();
    let mut extra = Raw::connect(&f);
    assert!(extra.closed(), "fifth connection was not refused");
    drop(held);
    let t0 = Instant::now();
    while f.server.connections() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_serving(&f);
}

#[test]
fn handshake_timeout_frees_the_slot() {
    let _g = serial();
    let f = fixture_with(ServerOptions {
        handshake_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    });
    let mut idle = Raw::connect(&f);
    let mut g = [0u8; 18];
    idle.s.read_exact(&mut g).unwrap();
    assert!(idle.closed(), "idle client kept its connection");
    // A client that sends options but never reads the replies is cut off
    // once the server's writes stall.
    let mut deaf = Raw::fixed(&f);
    deaf.s
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let list = proto::encode_option_header(proto::OptionHeader {
        option: opt::LIST,
        length: 0,
    });
    let many: Vec<u8> = list.iter().copied().cycle().take(16 * 50_000).collect();
    let _ = deaf.s.write_all(&many);
    let t0 = Instant::now();
    while f.server.connections() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "deaf client kept its slot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(deaf);
    // In transmission there is no timeout: an idle client keeps its slot.
    let mut c = Raw::go(&f, "origin");
    std::thread::sleep(Duration::from_millis(400));
    assert!(c.read(1, 0, 512).is_ok());
}

#[test]
fn disc_finishes_in_flight_requests_then_closes() {
    let _g = serial();
    let f = fixture();
    let mut c = Raw::go(&f, "origin");
    for i in 0..16u64 {
        c.request(cmd::WRITE, 0, i, i * 4096, 4096);
        c.s.write_all(&[0x99; 4096]).unwrap();
    }
    c.request(cmd::DISC, 0, 99, 0, 0);
    for _ in 0..16 {
        assert_eq!(c.reply().error, 0);
    }
    assert!(c.closed());
    let mut d = vec![0u8; 16 * 4096];
    f.origin.read_at(&mut d, 0).unwrap();
    assert!(d.iter().all(|&b| b == 0x99));
}

/// A device whose writes take a while, to catch shutdown cutting them off.
struct Slow(PlainDevice<MemDev>);

impl Device for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DevError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DevError> {
        std::thread::sleep(Duration::from_millis(300));
        self.0.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DevError> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DevError> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        self.0.write_zeroes(offset, len, fua)
    }
}

#[test]
fn shutdown_lets_in_flight_requests_finish() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let slow = Arc::new(Slow(PlainDevice::new(MemDev::new(MIB), false)));
    let exports = StaticExports::new().with("origin", slow.clone() as Arc<dyn Device>);
    let server = NbdServer::new(Arc::new(exports), ServerOptions::default());
    server.listen(&Listen::Unix(sock.clone())).unwrap();
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Raw { s };
    let mut g = [0u8; 18];
    c.s.read_exact(&mut g).unwrap();
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    c.info_go(opt::GO, "origin").unwrap();
    for i in 0..4u64 {
        c.request(cmd::WRITE, 0, i, i * 4096, 4096);
        c.s.write_all(&[0x77; 4096]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50)); // requests reach the workers
    let t = Instant::now();
    server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(5));
    for _ in 0..4 {
        assert_eq!(c.reply().error, 0);
    }
    assert!(c.closed());
    let mut d = vec![0u8; 4 * 4096];
    slow.0.read_at(&mut d, 0).unwrap();
    assert!(d.iter().all(|&b| b == 0x77));
    assert!(!sock.exists());
    assert!(UnixStream::connect(&sock).is_err());
}
