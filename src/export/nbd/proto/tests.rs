#![allow(clippy::indexing_slicing, clippy::unwrap_used)] // tests may panic

use super::*;

#[test]
fn greeting_is_magic_magic_flags() {
    let g = encode_greeting(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}

#[test]
fn client_flags_unknown_bits_are_refused() {
    let both = handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES;
    assert_eq!(
        parse_client_flags(3u32.to_be_bytes(), both),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(
        parse_client_flags(4u32.to_be_bytes(), both),
        Err(ProtoError::UnknownClientFlags(4))
    );
    // NO_ZEROES only if the server offered it.
    assert!(parse_client_flags(2u32.to_be_bytes(), handshake::FIXED_NEWSTYLE).is_err());
}

#[test]
fn option_header_round_trips_and_checks_magic() {
    let h = OptionHeader {
        option: opt::GO,
        length: 77,
    };
    assert_eq!(parse_option_header(&encode_option_header(h)), Ok(h));
    let mut bad = encode_option_header(h);
    bad[0] ^= 1;
    assert!(matches!(
        parse_option_header(&bad),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[test]
fn option_lengths_are_bounded() {
    assert_eq!(check_option_length(0), Ok(OptionLength::Read));
    assert_eq!(check_option_length(MAX_OPTION_DATA), Ok(OptionLength::Read));
    assert_eq!(
        check_option_length(MAX_OPTION_DATA + 1),
        Ok(OptionLength::Discard)
    );
    assert_eq!(
        check_option_length(u32::MAX),
        Err(ProtoError::OptionTooLong(u32::MAX))
    );
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

#[test]
fn go_parses_name_and_requests() {
    let d = info_data(b"origin", &[info::NAME, info::BLOCK_SIZE]);
    assert_eq!(
        parse_option(opt::GO, &d),
        Ok(NbdOption::Go(InfoRequest {
            name: "origin".into(),
            requests: vec![info::NAME, info::BLOCK_SIZE]
        }))
    );
}

#[test]
fn go_with_inconsistent_lengths_is_invalid() {
    let mut d = info_data(b"origin", &[info::NAME]);
    d.push(0);
    assert!(parse_option(opt::GO, &d).is_err());
    // name length pointing past the data
    let mut d = 100u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"abc");
    assert!(parse_option(opt::INFO, &d).is_err());
    // name length above 4096 with data that holds it
    let big = vec![b'a'; MAX_STRING + 1];
    assert_eq!(
        parse_option(opt::GO, &info_data(&big, &[])),
        Err(OptionInvalid("string longer than 4096 bytes"))
    );
    // not UTF-8
    assert!(parse_option(opt::GO, &info_data(&[0xff, 0xfe], &[])).is_err());
}

#[test]
fn options_without_data_refuse_data() {
    assert_eq!(parse_option(opt::LIST, &[]), Ok(NbdOption::List));
    assert!(parse_option(opt::LIST, &[1]).is_err());
    assert!(parse_option(opt::STRUCTURED_REPLY, &[1]).is_err());
    assert_eq!(parse_option(opt::ABORT, &[]), Ok(NbdOption::Abort));
    assert_eq!(parse_option(99, &[1, 2, 3]), Ok(NbdOption::Other(99)));
}

#[test]
fn meta_context_query_count_is_bounded_by_data() {
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&u32::MAX.to_be_bytes()); // absurd count, no queries
    assert!(parse_option(opt::SET_META_CONTEXT, &d).is_err());
    let mut d = 1u32.to_be_bytes().to_vec();
    d.push(b'x');
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&15u32.to_be_bytes());
    d.extend_from_slice(b"base:allocation");
    assert_eq!(
        parse_option(opt::LIST_META_CONTEXT, &d),
        Ok(NbdOption::ListMetaContext(MetaContextRequest {
            name: "x".into(),
            queries: vec!["base:allocation".into()]
        }))
    );
}

#[test]
fn request_round_trips_and_checks_magic() {
    let r = Request {
        flags: cmd_flags::FUA,
        command: cmd::WRITE,
        cookie: 0x0102_0304_0506_0708,
        offset: 1 << 40,
        length: 4096,
    };
    let b = r.encode();
    assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(parse_request(&b), Ok(r));
    let mut bad = b;
    bad[3] = 0;
    assert!(parse_request(&bad).is_err());
}

#[test]
fn payload_bounds() {
    assert_eq!(check_payload(MAX_PAYLOAD), Ok(PayloadCheck::Accept));
    assert_eq!(check_payload(MAX_PAYLOAD + 1), Ok(PayloadCheck::Discard));
    assert!(check_payload(u32::MAX).is_err());
}

#[test]
fn replies_encode_as_the_spec_says() {
    let s = encode_simple_reply(errno::EINVAL, 7);
    assert_eq!(
        parse_simple_reply(&s),
        Ok(SimpleReply {
            error: 22,
            cookie: 7
        })
    );
    let d = encode_offset_data_header(9, 4096, 512, true);
    let h: [u8; CHUNK_HEADER_LEN] = d[..CHUNK_HEADER_LEN].try_into().unwrap();
    assert_eq!(
        parse_chunk_header(&h),
        Ok(ChunkHeader {
            flags: chunk::FLAG_DONE,
            chunk_type: chunk::OFFSET_DATA,
            cookie: 9,
            length: 520
        })
    );
    assert_eq!(&d[CHUNK_HEADER_LEN..], &4096u64.to_be_bytes());

    let mut e = Vec::new();
    encode_error_chunk(&mut e, 3, errno::EIO, None, "boom", true);
    let h: [u8; CHUNK_HEADER_LEN] = e[..CHUNK_HEADER_LEN].try_into().unwrap();
    let h = parse_chunk_header(&h).unwrap();
    assert_eq!(h.chunk_type, chunk::ERROR);
    assert_eq!(h.length as usize, e.len() - CHUNK_HEADER_LEN);
    assert_eq!(
        &e[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4],
        &5u32.to_be_bytes()
    );
    assert_eq!(&e[CHUNK_HEADER_LEN + 6..], b"boom");

    let mut x = Vec::new();
    encode_export_name_reply(&mut x, 1 << 20, tflags::HAS_FLAGS, false);
    assert_eq!(x.len(), 8 + 2 + 124);
    x.clear();
    encode_export_name_reply(&mut x, 1 << 20, tflags::HAS_FLAGS, true);
    assert_eq!(x.len(), 10);
}

#[test]
fn option_reply_carries_length_and_magic() {
    let mut out = Vec::new();
    encode_info_block_size(&mut out, opt::GO, 512, 4096, MAX_PAYLOAD);
    let h: [u8; 20] = out[..20].try_into().unwrap();
    let h = parse_option_reply_header(&h).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: opt::GO,
            reply_type: rep::INFO,
            length: 14
        }
    );
    assert_eq!(&out[20..22], &info::BLOCK_SIZE.to_be_bytes());
    out.clear();
    encode_option_error(&mut out, opt::GO, rep::ERR_UNKNOWN, &"é".repeat(3000));
    // cut to 4096 bytes on a character boundary
    assert_eq!(out.len(), 20 + 4096);
    assert!(rep::is_error(rep::ERR_UNKNOWN) && !rep::is_error(rep::ACK));
}

#[test]
fn wire_errnos_map_host_errnos() {
    assert_eq!(errno::from_host(libc::ENOSPC), errno::ENOSPC);
    assert_eq!(errno::from_host(libc::EOPNOTSUPP), errno::ENOTSUP);
    assert_eq!(errno::from_host(libc::EBADF), errno::EIO);
}

#[test]
fn block_status_chunk_round_trips() {
    let mut out = Vec::new();
    encode_block_status(&mut out, 7, 3, &[(4096, 3), (8192, 0)], true);
    let h = parse_chunk_header(out[..CHUNK_HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(h.chunk_type, chunk::BLOCK_STATUS);
    assert_eq!(h.flags, chunk::FLAG_DONE);
    assert_eq!(h.cookie, 7);
    assert_eq!(h.length as usize, out.len() - CHUNK_HEADER_LEN);
    assert_eq!(
        parse_block_status(&out[CHUNK_HEADER_LEN..]),
        Some((3, vec![(4096, 3), (8192, 0)]))
    );
    assert_eq!(parse_block_status(&[0, 0, 0, 1, 0]), None);
    assert_eq!(parse_block_status(&[0, 0]), None);
    let mut m = Vec::new();
    encode_meta_context(&mut m, opt::SET_META_CONTEXT, 9, "base:allocation");
    let r = parse_option_reply_header(m[..20].try_into().unwrap()).unwrap();
    assert_eq!((r.reply_type, r.length), (rep::META_CONTEXT, 4 + 15));
    assert_eq!(&m[20..24], &9u32.to_be_bytes());
    assert_eq!(&m[24..], b"base:allocation");
}
