//! Property tests of the NBD codec: random bytes never panic the parsers,
//! lengths they return are bounded, and encoders round-trip through the
//! parsers. Also the server fed random bytes in every phase keeps serving.

use dmsnap::device::{Device, PlainDevice, StaticExports};
use dmsnap::export::nbd::proto::{self, cmd, opt, NbdOption, OptionLength, PayloadCheck};
use dmsnap::export::nbd::{Listen, NbdServer, ServerOptions};
use dmsnap::io::MemDev;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

fn any_option() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..16, any::<u32>()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_option_never_panics(option in any_option(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(o) = proto::parse_option(option, &data) {
            match o {
                NbdOption::Info(r) | NbdOption::Go(r) => {
                    prop_assert!(r.name.len() <= proto::MAX_STRING);
                    prop_assert!(r.requests.len() * 2 <= data.len());
                }
                NbdOption::ListMetaContext(m) | NbdOption::SetMetaContext(m) => {
                    prop_assert!(m.queries.len() * 4 <= data.len());
                }
                NbdOption::ExportName(n) => prop_assert_eq!(n.len(), data.len()),
                _ => {}
            }
        }
    }

    #[test]
    fn structured_option_data_round_trips(name in "[a-z0-9_-]{0,40}", reqs in proptest::collection::vec(any::<u16>(), 0..20)) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in &reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        match proto::parse_option(opt::GO, &d) {
            Ok(NbdOption::Go(r)) => {
                prop_assert_eq!(r.name, name);
                prop_assert_eq!(r.requests, reqs);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        // any truncation is refused, never a panic
        for cut in 0..d.len() {
            prop_assert!(proto::parse_option(opt::INFO, &d[..cut]).is_err());
        }
    }

    #[test]
    fn fixed_headers_never_panic(b in proptest::array::uniform32(any::<u8>())) {
        let req: [u8; proto::REQUEST_LEN] = b[..proto::REQUEST_LEN].try_into().unwrap();
        if let Ok(r) = proto::parse_request(&req) {
            prop_assert_eq!(r.encode(), req);
        }
        let oh: [u8; 16] = b[..16].try_into().unwrap();
        if let Ok(h) = proto::parse_option_header(&oh) {
            prop_assert_eq!(proto::encode_option_header(h), oh);
            // whatever the length, the decision is bounded
            match proto::check_option_length(h.length) {
                Ok(OptionLength::Read) => prop_assert!(h.length <= proto::MAX_OPTION_DATA),
                Ok(OptionLength::Discard) => prop_assert!(h.length <= proto::MAX_OPTION_DISCARD),
                Err(_) => prop_assert!(h.length > proto::MAX_OPTION_DISCARD),
            }
        }
        let _ = proto::parse_simple_reply(&b[..16].try_into().unwrap());
        let _ = proto::parse_chunk_header(&b[..20].try_into().unwrap());
        let _ = proto::parse_option_reply_header(&b[..20].try_into().unwrap());
        let _ = proto::parse_client_flags(b[..4].try_into().unwrap(), 3);
    }

    #[test]
    fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let r = proto::Request { flags, command, cookie, offset, length };
        prop_assert_eq!(proto::parse_request(&r.encode()), Ok(r));
        match proto::check_payload(length) {
            Ok(PayloadCheck::Accept) => prop_assert!(length <= proto::MAX_PAYLOAD),
            Ok(PayloadCheck::Discard) => prop_assert!(length <= proto::MAX_DISCARD_PAYLOAD),
            Err(_) => prop_assert!(length > proto::MAX_DISCARD_PAYLOAD),
        }
    }

    #[test]
    fn error_chunk_length_matches(msg in ".{0,200}", error: u32, cookie: u64, offset in proptest::option::of(any::<u64>())) {
        let mut out = Vec::new();
        proto::encode_error_chunk(&mut out, cookie, error, offset, &msg, true);
        let h = proto::parse_chunk_header(&out[..20].try_into().unwrap()).unwrap();
        prop_assert_eq!(h.length as usize, out.len() - 20);
        prop_assert_eq!(h.cookie, cookie);
    }
}

/// Random garbage at every stage of a session: the server never dies and a
/// fresh client afterwards reads what an earlier one wrote.
#[test]
fn server_survives_random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let dev = Arc::new(PlainDevice::new(MemDev::new(1 << 20), false));
    let exports = StaticExports::new().with("origin", dev.clone() as Arc<dyn Device>);
    let server = NbdServer::new(
        Arc::new(exports),
        ServerOptions {
            handshake_timeout: Duration::from_secs(2),
            ..ServerOptions::default()
        },
    );
    server.listen(&Listen::Unix(sock.clone())).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for round in 0..200 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        let mut msg = Vec::new();
        let stage = round % 3;
        if stage >= 1 {
            msg.extend_from_slice(&3u32.to_be_bytes());
        }
        if stage >= 2 {
            // a valid GO, then garbage in transmission
            let mut d = 6u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"origin");
            d.extend_from_slice(&0u16.to_be_bytes());
            msg.extend_from_slice(&proto::encode_option_header(proto::OptionHeader {
                option: opt::GO,
                length: d.len() as u32,
            }));
            msg.extend_from_slice(&d);
        }
        let n = rng.gen_range(0..2000);
        let start = msg.len();
        msg.resize(start + n, 0);
        rng.fill(&mut msg[start..]);
        // Sometimes garbage with valid magics, to get deeper.
        if stage == 2 && n >= 28 && rng.gen_bool(0.5) {
            msg[start..start + 4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        let _ = s.write_all(&msg);
        let mut sink = [0u8; 4096];
        while let Ok(n) = s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
    // still serving, and a write then read through a fresh connection works
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&proto::encode_option_header(proto::OptionHeader {
        option: opt::EXPORT_NAME,
        length: 6,
    }))
    .unwrap();
    s.write_all(b"origin").unwrap();
    let mut e = [0u8; 10];
    s.read_exact(&mut e).unwrap();
    let req = proto::Request {
        flags: 0,
        command: cmd::READ,
        cookie: 5,
        offset: 0,
        length: 512,
    };
    let mut want = vec![0u8; 512];
    dev.read_at(&mut want, 0).unwrap();
    s.write_all(&req.encode()).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(proto::parse_simple_reply(&h).unwrap().error, 0);
    let mut d = vec![0u8; 512];
    s.read_exact(&mut d).unwrap();
    assert_eq!(d, want);
    server.shutdown();
}
