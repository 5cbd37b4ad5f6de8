//! A minimal NBD client for tests: fixed newstyle, OPT_GO, simple replies,
//! one request at a time. Independent of the server's codec on purpose.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub struct NbdClient {
    s: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

fn rd<const N: usize>(s: &mut UnixStream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

impl NbdClient {
    /// Connect to `socket` and open export `name` with NBD_OPT_GO.
    pub fn connect(socket: &Path, name: &str) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        let magic = u64::from_be_bytes(rd::<8>(&mut s)?);
        assert_eq!(magic, 0x4e42444d41474943, "NBDMAGIC");
        let opt = u64::from_be_bytes(rd::<8>(&mut s)?);
        assert_eq!(opt, 0x49484156454F5054, "IHAVEOPT");
        let hflags = u16::from_be_bytes(rd::<2>(&mut s)?);
        assert!(hflags & 1 == 1, "fixed newstyle");
        s.write_all(&3u32.to_be_bytes())?; // C_FIXED_NEWSTYLE | C_NO_ZEROES
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&0x49484156454F5054u64.to_be_bytes());
        msg.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        s.write_all(&msg)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let m = u64::from_be_bytes(rd::<8>(&mut s)?);
            assert_eq!(m, 0x3e889045565a9, "option reply magic");
            let _opt = u32::from_be_bytes(rd::<4>(&mut s)?);
            let typ = u32::from_be_bytes(rd::<4>(&mut s)?);
            let len = u32::from_be_bytes(rd::<4>(&mut s)?);
            assert!(len < 1 << 20);
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload)?;
            if typ & 0x8000_0000 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "NBD_OPT_GO refused: {typ:#x} {}",
                        String::from_utf8_lossy(&payload)
                    ),
                ));
            }
            if typ == 3 && payload.len() >= 12 && payload[..2] == [0, 0] {
                size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                flags = u16::from_be_bytes(payload[10..12].try_into().unwrap());
            }
            if typ == 1 {
                break;
            }
        }
        Ok(NbdClient {
            s,
            size,
            flags,
            cookie: 1,
        })
    }

    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u32> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&0x25609513u32.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&typ.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.s.write_all(&h)?;
        let magic = u32::from_be_bytes(rd::<4>(&mut self.s)?);
        assert_eq!(magic, 0x67446698, "simple reply magic");
        let err = u32::from_be_bytes(rd::<4>(&mut self.s)?);
        let cookie = u64::from_be_bytes(rd::<8>(&mut self.s)?);
        assert_eq!(cookie, self.cookie);
        Ok(err)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.request(CMD_WRITE, 0, offset, data.len() as u32, data)
    }
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.request(CMD_WRITE, FLAG_FUA, offset, data.len() as u32, data)
    }
    pub fn flush(&mut self) -> io::Result<u32> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }
    /// Read `len` bytes; Err with the NBD error number on failure.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let err = self.request(CMD_READ, 0, offset, len, &[])?;
        if err != 0 {
            return Ok(Err(err));
        }
        let mut buf = vec![0u8; len as usize];
        self.s.read_exact(&mut buf)?;
        Ok(Ok(buf))
    }
    /// Read the whole export in 1 MiB requests.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(1 << 20) as u32;
            let b = self
                .read(off, n)?
                .map_err(|e| io::Error::other(format!("NBD read error {e}")))?;
            out.extend_from_slice(&b);
            off += n as u64;
        }
        Ok(out)
    }
    pub fn disconnect(mut self) -> io::Result<()> {
        let mut h = Vec::new();
        h.extend_from_slice(&0x25609513u32.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&CMD_DISC.to_be_bytes());
        h.extend_from_slice(&[0u8; 20]);
        self.s.write_all(&h)
    }
}

/// Pieces for tests that keep a request in flight (a stuck device) or must
/// not wait forever for a reply.
impl NbdClient {
    /// Read and write timeouts on the socket: a reply that does not come
    /// fails the call (`WouldBlock`/`TimedOut`) instead of hanging the test.
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.s.set_read_timeout(t)?;
        self.s.set_write_timeout(t)
    }

    /// Send one request without waiting for its reply; returns its cookie.
    pub fn send(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&0x25609513u32.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&typ.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.s.write_all(&h)?;
        Ok(self.cookie)
    }

    /// Receive one simple reply header: (error, cookie). A successful READ
    /// reply is followed by its data, which the caller must read.
    pub fn recv(&mut self) -> io::Result<(u32, u64)> {
        let magic = u32::from_be_bytes(rd::<4>(&mut self.s)?);
        if magic != 0x67446698 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply magic {magic:#x}"),
            ));
        }
        let err = u32::from_be_bytes(rd::<4>(&mut self.s)?);
        let cookie = u64::from_be_bytes(rd::<8>(&mut self.s)?);
        Ok((err, cookie))
    }
}
