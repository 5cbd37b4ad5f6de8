//! Block status with real clients against `dmsnap serve`: `nbdinfo --map`
//! (base:allocation, qemu:dirty-bitmap:S, qemu:allocation-depth), `qemu-img
//! map` and `qemu-img convert` over NBD, `nbdcopy`, the incremental backup
//! recipe (`scripts/nbd-backup.py`) end to end, `dmsnap diff` online and
//! offline; and at the protocol level: meta-context negotiation, REQ_ONE,
//! and a client that stops reading cannot hold writers back for long.

mod common;
mod support;

use dmsnap::device::{Device, ExportSet, StaticExports};
use dmsnap::export::nbd::proto::{self, chunk, cmd, cmd_flags, opt, rep};
use dmsnap::export::nbd::{Listen, NbdServer, ServerOptions};
use dmsnap::io::MemDev;
use dmsnap::snap::{ExportDevice, Origin};
use dmsnap::store::StoreType;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{ok, Daemon};

const MIB: u64 = 1 << 20;

fn uri(pool: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        pool.join("nbd.sock").display()
    )
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("tool installed by scripts/test.sh");
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn qemu_io(pool: &Path, export: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri(pool, export));
    run(&mut c);
}

/// `nbdinfo --json --map[=CTX]`: `(offset, length, type)`.
fn nbdinfo_map(pool: &Path, export: &str, ctx: &str) -> Vec<(u64, u64, u64)> {
    let map = if ctx.is_empty() {
        "--map".to_string()
    } else {
        format!("--map={ctx}")
    };
    let out = run(Command::new("nbdinfo")
        .args(["--json", &map])
        .arg(uri(pool, export)));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The ranges of `map` with type `t`, adjacent ones merged.
fn of_type(map: &[(u64, u64, u64)], t: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for &(o, l, ty) in map {
        if ty != t {
            continue;
        }
        match v.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => v.push((o, l)),
        }
    }
    v
}

fn diff_json(pool: &Path, args: &[&str]) -> (u64, Vec<(u64, u64)>) {
    let mut a = vec!["diff", pool.to_str().unwrap()];
    a.extend_from_slice(args);
    a.push("--json");
    let v: Value = serde_json::from_str(&ok(&a)).unwrap();
    let ext = v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    (v["chunk_size"].as_u64().unwrap(), ext)
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn real_clients_read_block_status_and_the_backup_recipe_works() {
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("pool");
    let ps = pool.to_str().unwrap();
    ok(&["create", ps, "--size", "32M"]);
    let d = Daemon::start(&pool, &[]);
    qemu_io(
        &pool,
        "origin",
        &["write -P 0xab 0 2M", "write -P 0xac 20M 1M"],
    );
    ok(&["snapshot", "create", ps, "s1", "--chunk-size", "8k"]);
    qemu_io(
        &pool,
        "origin",
        &[
            "write -P 0xcd 4096 4096",
            "write -P 0xce 10M 300k",
            "write -P 0xcf 31M 64k",
        ],
    );

    // base:allocation on the origin: written ranges are data, the rest of
    // the sparse origin is hole+zero.
    let map = nbdinfo_map(&pool, "origin", "");
    let holes = of_type(&map, 3);
    assert!(
        holes.iter().any(|&(o, l)| o <= 4 * MIB && o + l >= 9 * MIB),
        "{map:?}"
    );
    for &(o, l) in &of_type(&map, 0) {
        // Every data extent overlaps something written.
        let written = [
            (0, 2 * MIB),
            (10 * MIB, 300 << 10),
            (20 * MIB, MIB),
            (31 * MIB, 64 << 10),
        ];
        assert!(
            written
                .iter()
                .any(|&(a, n)| o < a + n + 4096 && a < o + l + 4096),
            "data at {o}+{l} where nothing was written: {map:?}"
        );
    }

    // qemu:dirty-bitmap:s1 on the origin = the origin chunks written since
    // s1 (8 KiB chunks), exactly; and `dmsnap diff` says the same online.
    let dirty = of_type(&nbdinfo_map(&pool, "origin", "qemu:dirty-bitmap:s1"), 1);
    let want = vec![(0, 8192), (10 * MIB, 304 << 10), (31 * MIB, 64 << 10)];
    assert_eq!(dirty, want);
    let (cs, online) = diff_json(&pool, &["s1"]);
    assert_eq!((cs, online.clone()), (8192, want.clone()));
    let human = ok(&["diff", ps, "s1"]);
    assert!(human.starts_with("0 8192\n10485760 311296\n"), "{human}");
    assert!(human.contains("total 385024 bytes in 3 extents"), "{human}");

    // allocation-depth on s1: in the COW (1) where the origin changed,
    // from the origin (2) where it has data, absent (0) elsewhere.
    let depth = nbdinfo_map(&pool, "s1", "qemu:allocation-depth");
    assert_eq!(of_type(&depth, 1), want);
    assert!(
        of_type(&depth, 2).contains(&(8192, 2 * MIB - 8192)),
        "{depth:?}"
    );

    // qemu-img map over NBD: data where s1 has COW copies.
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(uri(&pool, "s1")));
    let m: Value = serde_json::from_str(&out).unwrap();
    let data: Vec<(u64, u64)> = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool().unwrap())
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, want, "{out}");
    let zero = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["zero"].as_bool().unwrap())
        .count();
    assert!(zero > 0, "{out}");

    // Full backup of s1 with the script, then more writes, then s2: the
    // incremental backup reads only the dirty extents of s2 relative to s1.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbd-backup.py");
    let backup = t.path().join("backup.img");
    let py = |args: &[&str]| {
        let o = Command::new("/usr/bin/python3")
            .arg(&script)
            .args(args)
            .output()
            .expect("python3 with python3-libnbd (scripts/test.sh)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stderr).unwrap()
    };
    py(&["full", &uri(&pool, "s1"), backup.to_str().unwrap()]);
    let s1_copy = t.path().join("s1.img");
    run(Command::new("nbdcopy").arg(uri(&pool, "s1")).arg(&s1_copy));
    assert!(std::fs::read(&backup).unwrap() == std::fs::read(&s1_copy).unwrap());
    qemu_io(
        &pool,
        "origin",
        &["write -P 0x11 5M 12k", "write -P 0x12 20M 4k"],
    );
    ok(&["snapshot", "create", ps, "s2"]);
    qemu_io(&pool, "origin", &["write -P 0x13 6M 1M"]); // after s2: not in it
    let msg = py(&[
        "incremental",
        &uri(&pool, "s2"),
        "s1",
        backup.to_str().unwrap(),
    ]);
    let copied: u64 = msg.split_whitespace().nth(2).unwrap().parse().unwrap();
    let (_, s2_vs_s1) = diff_json(&pool, &["s1", "s2"]);
    assert_eq!(copied, s2_vs_s1.iter().map(|e| e.1).sum::<u64>(), "{msg}");
    assert!(copied < 2 * MIB, "{msg}");
    let bitmap_s2 = of_type(&nbdinfo_map(&pool, "s2", "qemu:dirty-bitmap:s1"), 1);
    assert_eq!(bitmap_s2, s2_vs_s1);

    // nbdcopy and qemu-img convert of s2 (both skip zero extents: sparse
    // results) equal the backup byte for byte.
    let s2_copy = t.path().join("s2.img");
    run(Command::new("nbdcopy").arg(uri(&pool, "s2")).arg(&s2_copy));
    let conv = t.path().join("s2-convert.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri(&pool, "s2"))
        .arg(&conv));
    let b = std::fs::read(&backup).unwrap();
    assert!(
        b == std::fs::read(&s2_copy).unwrap(),
        "backup differs from s2"
    );
    assert!(
        b == std::fs::read(&conv).unwrap(),
        "qemu-img convert differs from s2"
    );
    for f in [&s2_copy, &conv] {
        assert!(
            allocated_bytes(f) < 12 * MIB,
            "{} is not sparse: {} bytes allocated",
            f.display(),
            allocated_bytes(f)
        );
    }

    // Offline, from the COWs: the same extents as online.
    let online_s1 = diff_json(&pool, &["s1"]).1;
    let online_s2 = diff_json(&pool, &["s2"]).1;
    assert!(online_s1.len() > online.len());
    drop(d);
    assert_eq!(diff_json(&pool, &["s1"]).1, online_s1);
    assert_eq!(diff_json(&pool, &["s2"]).1, online_s2);
    assert_eq!(online_s2, vec![(6 * MIB, MIB)]);
    assert_eq!(diff_json(&pool, &["s1", "s2"]).1, s2_vs_s1);
    assert_eq!(diff_json(&pool, &["s1", "origin"]).1, online_s1);
    assert!(diff_json(&pool, &["s2", "s2"]).1.is_empty());
}

// ---------------------------------------------------------------------------
// Protocol level

struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        let mut g = [0u8; proto::GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw { s }
    }
    fn option(&mut self, option: u32, data: &[u8]) {
        let h = proto::encode_option_header(proto::OptionHeader {
            option,
            length: data.len() as u32,
        });
        self.s.write_all(&h).unwrap();
        self.s.write_all(data).unwrap();
    }
    /// Replies until a final one: `(type, data)` of each.
    fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let r = proto::parse_option_reply_header(&h).unwrap();
            let mut d = vec![0u8; r.length as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = r.reply_type != rep::META_CONTEXT && r.reply_type != rep::INFO;
            v.push((r.reply_type, d));
            if last {
                return v;
            }
        }
    }
    fn meta(&mut self, option: u32, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.option(option, &d);
        let r = self.replies();
        assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");
        r[..r.len() - 1]
            .iter()
            .map(|(t, d)| {
                assert_eq!(*t, rep::META_CONTEXT);
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    String::from_utf8(d[4..].to_vec()).unwrap(),
                )
            })
            .collect()
    }
    fn go(&mut self, export: &str) {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(opt::GO, &d);
        assert_eq!(self.replies().last().unwrap().0, rep::ACK);
    }
    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = proto::Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }
    /// Chunks of one structured reply: `(type, payload)`.
    fn structured(&mut self) -> Vec<(u16, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m).unwrap();
            if u32::from_be_bytes(m) == proto::SIMPLE_REPLY_MAGIC {
                let mut rest = [0u8; 12];
                self.s.read_exact(&mut rest).unwrap();
                v.push((u16::MAX, rest[..4].to_vec()));
                return v;
            }
            let mut h = [0u8; proto::CHUNK_HEADER_LEN];
            h[..4].copy_from_slice(&m);
            self.s.read_exact(&mut h[4..]).unwrap();
            let c = proto::parse_chunk_header(&h).unwrap();
            let mut d = vec![0u8; c.length as usize];
            self.s.read_exact(&mut d).unwrap();
            v.push((c.chunk_type, d));
            if c.flags & chunk::FLAG_DONE != 0 {
                return v;
            }
        }
    }
}

struct Served {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    origin: Arc<Origin>,
    server: NbdServer,
}

fn served(opts: ServerOptions) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let origin = Origin::new(Arc::new(MemDev::new(8 * MIB)));
    origin.write_at(&vec![5u8; MIB as usize], 0, false).unwrap();
    let s1 = origin
        .add_snapshot(
            "s1",
            Arc::new(MemDev::new(16 * MIB)),
            StoreType::Transient,
            None,
        )
        .unwrap();
    origin.write_at(&[6u8; 4096], 3 * 4096, false).unwrap();
    let exports = StaticExports::new()
        .with("origin", Arc::new(ExportDevice::origin(origin.clone())))
        .with("s1", Arc::new(ExportDevice::snapshot(origin.clone(), s1)));
    assert_eq!(exports.names().len(), 2);
    let server = NbdServer::new(Arc::new(exports), opts);
    server.listen(&Listen::Unix(sock.clone())).unwrap();
    Served {
        _dir: dir,
        sock,
        origin,
        server,
    }
}

#[test]
fn meta_contexts_are_negotiated_as_qemu_nbd_does() {
    let f = served(ServerOptions::default());
    let mut c = Raw::connect(&f.sock);
    // Before structured replies: refused.
    let mut d = 6u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"origin");
    d.extend_from_slice(&0u32.to_be_bytes());
    c.option(opt::SET_META_CONTEXT, &d);
    assert_eq!(c.replies()[0].0, rep::ERR_INVALID);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies()[0].0, rep::ACK);
    let names = |v: Vec<(u32, String)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    let all = vec![
        "base:allocation".to_string(),
        "qemu:allocation-depth".into(),
        "qemu:dirty-bitmap:s1".into(),
    ];
    assert_eq!(names(c.meta(opt::LIST_META_CONTEXT, "origin", &[])), all);
    assert_eq!(
        names(c.meta(opt::LIST_META_CONTEXT, "origin", &["qemu:"])),
        all[1..].to_vec()
    );
    assert_eq!(
        names(c.meta(
            opt::LIST_META_CONTEXT,
            "s1",
            &["qemu:dirty-bitmap:", "base:"]
        )),
        vec![all[0].clone(), all[2].clone()]
    );
    assert!(c
        .meta(
            opt::LIST_META_CONTEXT,
            "origin",
            &["nbd-server:x", "qemu:dirty-bitmap:nope"]
        )
        .is_empty());
    // SET takes exact names only, and hands out distinct ids.
    assert!(c
        .meta(opt::SET_META_CONTEXT, "origin", &["qemu:"])
        .is_empty());
    let set = c.meta(
        opt::SET_META_CONTEXT,
        "origin",
        &["qemu:dirty-bitmap:s1", "base:allocation", "x-unknown:thing"],
    );
    assert_eq!(set.len(), 2);
    assert_ne!(set[0].0, set[1].0);
    c.go("origin");
    let id = |name: &str| set.iter().find(|(_, n)| n == name).unwrap().0;

    // BLOCK_STATUS with REQ_ONE: one descriptor per context, within the request.
    c.request(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 1, 0, 64 * 1024);
    let r = c.structured();
    assert_eq!(r.len(), 2);
    for (t, payload) in &r {
        assert_eq!(*t, chunk::BLOCK_STATUS);
        let (ctx, d) = proto::parse_block_status(payload).unwrap();
        assert_eq!(d.len(), 1);
        if ctx == id("qemu:dirty-bitmap:s1") {
            assert_eq!(d[0], (3 * 4096, 0));
        } else {
            assert_eq!(ctx, id("base:allocation"));
            assert_eq!(d[0], (64 * 1024, 0));
        }
    }
    // Without: the whole range, dirty chunk 3 only.
    c.request(cmd::BLOCK_STATUS, 0, 2, 0, (8 * MIB) as u32);
    let r = c.structured();
    let bitmap = r
        .iter()
        .map(|(_, p)| proto::parse_block_status(p).unwrap())
        .find(|(i, _)| *i == id("qemu:dirty-bitmap:s1"))
        .unwrap()
        .1;
    assert_eq!(
        bitmap,
        vec![(3 * 4096, 0), (4096, 1), ((8 * MIB - 4 * 4096) as u32, 0)]
    );
    // Bad requests: zero length, beyond the end, unknown flag.
    for (flags, off, len) in [(0, 0, 0), (0, 8 * MIB, 512), (cmd_flags::FUA, 0, 512)] {
        c.request(cmd::BLOCK_STATUS, flags, 3, off, len);
        let r = c.structured();
        assert_eq!(r[0].0, u16::MAX, "simple error reply");
        assert_eq!(r[0].1, proto::errno::EINVAL.to_be_bytes());
    }
    f.server.shutdown();
}

#[test]
fn block_status_without_contexts_is_einval() {
    let f = served(ServerOptions::default());
    let mut c = Raw::connect(&f.sock);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies()[0].0, rep::ACK);
    // Contexts set for another export do not carry over.
    assert_eq!(
        c.meta(opt::SET_META_CONTEXT, "s1", &["base:allocation"])
            .len(),
        1
    );
    c.go("origin");
    c.request(cmd::BLOCK_STATUS, 0, 1, 0, 4096);
    let r = c.structured();
    assert_eq!(r[0].1, proto::errno::EINVAL.to_be_bytes());
}

#[test]
fn a_client_that_stops_reading_does_not_hold_writers_back_for_long() {
    let f = served(ServerOptions {
        block_status_send_timeout: Duration::from_millis(500),
        ..ServerOptions::default()
    });
    let mut c = Raw::connect(&f.sock);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies()[0].0, rep::ACK);
    c.meta(opt::SET_META_CONTEXT, "origin", &["qemu:dirty-bitmap:s1"]);
    c.go("origin");
    // Fill the socket with read replies nobody reads (a few workers stay
    // free), then ask for block status of the first MiB: its reply cannot
    // be sent.
    // (The server asks for 4 MiB socket buffers, which the kernel doubles.)
    for i in 0..12 {
        c.request(cmd::READ, 0, 100 + i, 0, MIB as u32);
    }
    std::thread::sleep(Duration::from_millis(200));
    c.request(cmd::BLOCK_STATUS, 0, 1, 0, MIB as u32);
    std::thread::sleep(Duration::from_millis(100));
    // A writer to that range is held back by the undelivered answer, but
    // only until the send timeout cuts the connection.
    let t = Instant::now();
    f.origin.write_at(&[1u8; 4096], 8192, false).unwrap();
    let waited = t.elapsed();
    assert!(
        waited > Duration::from_millis(100) && waited < Duration::from_secs(5),
        "writer held back {waited:?}"
    );
    // The connection was cut: the client eventually reads end of file.
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match c.s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(total < 12 * MIB as usize, "every reply arrived: not cut");
    f.server.shutdown();
}

#[test]
fn wire_answers_equal_the_engine_answers_for_random_requests() {
    use dmsnap::device::MetaContext;
    use rand::{Rng, SeedableRng};
    let f = served(ServerOptions {
        max_block_status_extents: 7,
        ..ServerOptions::default()
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let s1 = f.origin.snapshot("s1").unwrap();
    for _ in 0..200 {
        let off = rng.gen_range(0..8 * MIB - 4096) & !511;
        let len = rng.gen_range(1..64 * 1024u64).min(8 * MIB - off);
        let buf = vec![rng.gen::<u8>() | 1; len as usize];
        if rng.gen_bool(0.3) {
            s1.write_at(&buf, off, false).unwrap();
        } else {
            f.origin.write_at(&buf, off, false).unwrap();
        }
    }
    for export in ["origin", "s1"] {
        let mut c = Raw::connect(&f.sock);
        c.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.replies()[0].0, rep::ACK);
        let set = c.meta(
            opt::SET_META_CONTEXT,
            export,
            &[
                "base:allocation",
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:s1",
            ],
        );
        assert_eq!(set.len(), 3);
        c.go(export);
        let dev: Box<dyn Device> = match export {
            "origin" => Box::new(ExportDevice::origin(f.origin.clone())),
            _ => Box::new(ExportDevice::snapshot(f.origin.clone(), s1.clone())),
        };
        for cookie in 0..100u64 {
            let off = rng.gen_range(0..8 * MIB - 512) & !511;
            let len = rng.gen_range(1..8 * MIB - off + 1);
            let one = rng.gen_bool(0.3);
            let flags = if one { cmd_flags::REQ_ONE } else { 0 };
            c.request(cmd::BLOCK_STATUS, flags, cookie, off, len as u32);
            let r = c.structured();
            assert_eq!(r.len(), 3);
            for (t, payload) in r {
                assert_eq!(t, chunk::BLOCK_STATUS);
                let (id, d) = proto::parse_block_status(&payload).unwrap();
                let ctx =
                    MetaContext::parse(&set.iter().find(|(i, _)| *i == id).unwrap().1).unwrap();
                let want = dev
                    .block_status(
                        off,
                        len,
                        std::slice::from_ref(&ctx),
                        if one { 1 } else { 7 },
                    )
                    .unwrap();
                let want: Vec<(u32, u32)> = want.extents[0]
                    .iter()
                    .map(|e| (e.len as u32, e.flags))
                    .collect();
                assert_eq!(d, want, "{export} {ctx:?} at {off}+{len} (REQ_ONE {one})");
                assert!(!d.is_empty() && (!one || d.len() == 1) && d.len() <= 7);
                assert!(d.iter().map(|x| u64::from(x.0)).sum::<u64>() <= len);
            }
        }
    }
    f.server.shutdown();
}
