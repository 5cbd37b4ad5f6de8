//! Arbitrary bytes as a COW device: `check` and both `dump` forms must never
//! panic, and must agree on what they read. A `dump --json` that parses back
//! must restore (into memory) to a store that dumps to the same document.
#![no_main]

use dmsnap::io::MemDev;
use dmsnap::tools::check::{check, CheckOptions};
use dmsnap::tools::dump::{dump, DumpFormat, DumpOptions};
use dmsnap::tools::restore::{write_metadata, DumpDoc};
use libfuzzer_sys::fuzz_target;

// Single-threaded walks (readahead 0): the read-ahead threads' TLS
// destructors show up as a 32-byte LeakSanitizer false positive. That the
// read-ahead path gives identical results is tested in tests/golden_tools.rs.
fn opts(dev: &MemDev, format: DumpFormat) -> DumpOptions<'_> {
    let mut o = DumpOptions::new(dev, format);
    o.readahead = 0;
    o
}

fn dump_json(dev: &MemDev) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    dump(&opts(dev, DumpFormat::Json), &mut out).ok()?;
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    // Bound the device: the tools are linear in its size.
    if data.len() > 1 << 20 {
        return;
    }
    let dev = MemDev::from_vec(data.to_vec());
    let mut copts = CheckOptions::new(&dev);
    copts.readahead = 0;
    let report = check(&copts);
    let mut human = Vec::new();
    let _ = dump(&opts(&dev, DumpFormat::Human), &mut human);
    let Some(json) = dump_json(&dev) else {
        return;
    };
    let doc = DumpDoc::parse(&json).expect("dump --json output always parses");
    if let Ok(r) = &report {
        assert_eq!(
            r.exceptions,
            doc.exceptions.len() as u64,
            "check and dump disagree"
        );
    }
    // Only a consistent record list can be restored.
    let Ok(plan) = doc.plan() else {
        return;
    };
    if plan.needed_bytes > 4 << 20 {
        return;
    }
    let out = MemDev::new(plan.needed_bytes);
    write_metadata(&out, &doc, &plan).expect("restore into memory");
    let again = dump_json(&out).expect("restored store dumps");
    let doc2 = DumpDoc::parse(&again).expect("parses");
    assert_eq!(doc.exceptions, doc2.exceptions);
    assert_eq!((doc.valid, doc.chunk_size), (doc2.valid, doc2.chunk_size));
});
