//! In-core exception tables (kernel `struct dm_exception_table`, §1.9), kept
//! as sorted runs of consecutive chunks instead of a hash of list nodes.
//!
//! A run `(old, new, n)` maps origin chunks `old..old+n` to COW chunks
//! `new..new+n` (`n` ≤ 256, the kernel's `DM_CHUNK_CONSECUTIVE_BITS = 8`).
//! Runs live in a list of sorted blocks (≤ [`BLOCK_MAX`] runs each) found by
//! binary search; each run takes 12 bytes (40-bit `old_chunk`, 48-bit
//! `new_chunk`, 8-bit count), so a table of scattered exceptions costs about
//! 12–15 bytes per exception and a table of long runs far less. Chunks that
//! do not fit those widths (origins beyond 2^40 chunks, COWs beyond 2^48) go
//! to a side map, one entry per chunk.

use crate::units::Chunk;
use std::collections::BTreeMap;

/// Most runs in one block before it is split.
pub const BLOCK_MAX: usize = 1024;
/// Longest run (kernel: 8 bits of "additional consecutive chunks").
pub const MAX_RUN: u64 = 256;

const OLD_BITS: u32 = 40;
const NEW_BITS: u32 = 48;

/// One run, packed into 12 bytes: `w0` = old bits 0..32; `w1` = old bits
/// 32..40 | (count-1) << 8 | new bits 0..16 << 16; `w2` = new bits 16..48.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Run {
    w: [u32; 3],
}

impl Run {
    fn new(old: u64, new: u64, len: u64) -> Run {
        debug_assert!(old >> OLD_BITS == 0 && new >> NEW_BITS == 0);
        debug_assert!((1..=MAX_RUN).contains(&len));
        Run {
            w: [
                old as u32,
                ((old >> 32) as u32 & 0xff)
                    | (((len - 1) as u32) << 8)
                    | ((new as u32 & 0xffff) << 16),
                (new >> 16) as u32,
            ],
        }
    }
    fn old(self) -> u64 {
        self.w[0] as u64 | ((self.w[1] as u64 & 0xff) << 32)
    }
    fn len(self) -> u64 {
        ((self.w[1] >> 8) & 0xff) as u64 + 1
    }
    fn new_chunk(self) -> u64 {
        (self.w[1] >> 16) as u64 | ((self.w[2] as u64) << 16)
    }
    /// One past the last origin chunk.
    fn end(self) -> u64 {
        self.old() + self.len()
    }
    fn contains(self, chunk: u64) -> bool {
        chunk >= self.old() && chunk < self.end()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}→{}", self.old(), self.len(), self.new_chunk())
    }
}

fn fits(old: u64, new: u64) -> bool {
    old.checked_add(MAX_RUN).is_some_and(|e| e >> OLD_BITS == 0)
        && new.checked_add(MAX_RUN).is_some_and(|e| e >> NEW_BITS == 0)
}

/// A run of consecutive exceptions: origin `old_chunk..old_chunk+len` →
/// COW `new_chunk..new_chunk+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExceptionRun {
    pub old_chunk: Chunk,
    pub new_chunk: Chunk,
    pub len: u64,
}

/// Completed exceptions of one snapshot.
#[derive(Default)]
pub struct ExceptionTable {
    /// Sorted by `old`; no block is empty; runs never overlap.
    blocks: Vec<Vec<Run>>,
    /// Chunks too large for the packed form: old → new, one per chunk.
    wide: BTreeMap<u64, u64>,
    count: u64,
}

impl std::fmt::Debug for ExceptionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExceptionTable")
            .field("exceptions", &self.count)
            .field("runs", &self.nr_runs())
            .finish()
    }
}

/// Grow `v` by a quarter (not double) so spare capacity stays small.
fn reserve_some(v: &mut Vec<Run>) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 4).max(4));
    }
}

impl ExceptionTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Exceptions (chunks) in the table.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Runs stored (a wide-map entry counts as one run).
    pub fn nr_runs(&self) -> usize {
        self.blocks.iter().map(Vec::len).sum::<usize>() + self.wide.len()
    }

    /// Heap bytes held (an honest estimate: allocated capacity, block
    /// headers, and ~48 bytes per wide-map entry).
    pub fn memory_bytes(&self) -> usize {
        self.blocks.capacity() * std::mem::size_of::<Vec<Run>>()
            + self
                .blocks
                .iter()
                .map(|b| b.capacity() * std::mem::size_of::<Run>())
                .sum::<usize>()
            + self.wide.len() * 48
    }

    /// Index of the block that holds (or would hold) `chunk`.
    fn block_for(&self, chunk: u64) -> usize {
        // First block whose first run starts after `chunk`, minus one.
        let i = self.blocks.partition_point(|b| b[0].old() <= chunk);
        i.saturating_sub(1)
    }

    /// Position in block `b` of the run containing `chunk`, or Err(insert position).
    fn find_in(block: &[Run], chunk: u64) -> Result<usize, usize> {
        let i = block.partition_point(|r| r.old() <= chunk);
        if i > 0 && block[i - 1].contains(chunk) {
            Ok(i - 1)
        } else {
            Err(i)
        }
    }

    /// `dm_lookup_exception`: the COW chunk holding origin chunk `chunk`.
    pub fn lookup(&self, chunk: Chunk) -> Option<Chunk> {
        self.lookup_run(chunk)
            .map(|r| Chunk(r.new_chunk.0 + (chunk.0 - r.old_chunk.0)))
    }

    /// The run holding `chunk`.
    pub fn lookup_run(&self, chunk: Chunk) -> Option<ExceptionRun> {
        let c = chunk.0;
        if !self.blocks.is_empty() {
            let block = &self.blocks[self.block_for(c)];
            if let Ok(i) = Self::find_in(block, c) {
                let r = block[i];
                return Some(ExceptionRun {
                    old_chunk: Chunk(r.old()),
                    new_chunk: Chunk(r.new_chunk()),
                    len: r.len(),
                });
            }
        }
        self.wide.get(&c).map(|&n| ExceptionRun {
            old_chunk: chunk,
            new_chunk: Chunk(n),
            len: 1,
        })
    }

    /// `dm_insert_exception`: add `old → new`, extending a neighbouring run
    /// when both sides are consecutive. Returns false (table unchanged) if
    /// `old` already has an exception.
    pub fn insert(&mut self, old: Chunk, new: Chunk) -> bool {
        let (o, n) = (old.0, new.0);
        if self.lookup(old).is_some() {
            return false;
        }
        self.count += 1;
        if !fits(o, n) {
            self.wide.insert(o, n);
            return true;
        }
        if self.blocks.is_empty() {
            self.blocks.push(vec![Run::new(o, n, 1)]);
            return true;
        }
        let bi = self.block_for(o);
        let pos = match Self::find_in(&self.blocks[bi], o) {
            Ok(_) => unreachable!("looked up above"),
            Err(p) => p,
        };
        // The run before (possibly the last of the previous block is not
        // needed: block_for picks the block whose first run is <= o).
        let block = &mut self.blocks[bi];
        let prev = pos.checked_sub(1).map(|p| block[p]);
        let next = block.get(pos).copied();
        let ext_prev =
            prev.filter(|r| r.end() == o && r.new_chunk() + r.len() == n && r.len() < MAX_RUN);
        let ext_next =
            next.filter(|r| r.old() == o + 1 && r.new_chunk() == n + 1 && r.len() < MAX_RUN);
        match (ext_prev, ext_next) {
            (Some(p), Some(x)) if p.len() + 1 + x.len() <= MAX_RUN => {
                block[pos - 1] = Run::new(p.old(), p.new_chunk(), p.len() + 1 + x.len());
                block.remove(pos);
            }
            (Some(p), _) => block[pos - 1] = Run::new(p.old(), p.new_chunk(), p.len() + 1),
            (None, Some(x)) => block[pos] = Run::new(o, n, x.len() + 1),
            (None, None) => {
                // Before the first run of block 0: still block 0.
                reserve_some(block);
                block.insert(pos, Run::new(o, n, 1));
                if block.len() > BLOCK_MAX {
                    self.split(bi);
                }
            }
        }
        // A merge across a block boundary (next run in the next block) is
        // not attempted: it costs memory only, never correctness.
        true
    }

    fn split(&mut self, bi: usize) {
        let block = &mut self.blocks[bi];
        let half = block.len() / 2;
        let mut tail = Vec::with_capacity(block.len() - half + (block.len() - half) / 8);
        tail.extend_from_slice(&block[half..]);
        block.truncate(half);
        block.shrink_to(half + half / 8);
        self.blocks.insert(bi + 1, tail);
    }

    /// Load many exceptions at once (activation): sorts once and packs
    /// blocks full. Falls back to [`insert`](Self::insert) for a non-empty
    /// table. Duplicates keep the first record.
    pub fn bulk_load(&mut self, exceptions: impl IntoIterator<Item = (Chunk, Chunk)>) {
        if !self.is_empty() {
            for (o, n) in exceptions {
                self.insert(o, n);
            }
            return;
        }
        let mut v: Vec<(u64, u64)> = exceptions.into_iter().map(|(o, n)| (o.0, n.0)).collect();
        // Stable: the first of duplicate old chunks stays first.
        v.sort_by_key(|e| e.0);
        v.dedup_by_key(|e| e.0);
        self.count = v.len() as u64;
        let mut runs: Vec<Run> = Vec::new();
        let mut cur: Option<(u64, u64, u64)> = None;
        let flush = |cur: Option<(u64, u64, u64)>, runs: &mut Vec<Run>| {
            if let Some((o, n, l)) = cur {
                runs.push(Run::new(o, n, l));
            }
        };
        for (o, n) in v {
            if !fits(o, n) {
                self.wide.insert(o, n);
                continue;
            }
            match cur {
                Some((co, cn, cl)) if co + cl == o && cn + cl == n && cl < MAX_RUN => {
                    cur = Some((co, cn, cl + 1));
                }
                _ => {
                    flush(cur, &mut runs);
                    cur = Some((o, n, 1));
                }
            }
        }
        flush(cur, &mut runs);
        // Blocks 7/8 full, room to grow without reallocating at once.
        let per = BLOCK_MAX * 7 / 8;
        self.blocks = runs
            .chunks(per)
            .map(|c| {
                let mut b = Vec::with_capacity(c.len());
                b.extend_from_slice(c);
                b
            })
            .collect();
        self.blocks.shrink_to_fit();
    }

    /// Remove the exception for `old`; returns its COW chunk. Merge takes
    /// chunks from either end of a run; a chunk in the middle splits it.
    pub fn remove(&mut self, old: Chunk) -> Option<Chunk> {
        let o = old.0;
        if let Some(n) = self.wide.remove(&o) {
            self.count -= 1;
            return Some(Chunk(n));
        }
        if self.blocks.is_empty() {
            return None;
        }
        let bi = self.block_for(o);
        let block = &mut self.blocks[bi];
        let i = Self::find_in(block, o).ok()?;
        let r = block[i];
        let new = r.new_chunk() + (o - r.old());
        self.count -= 1;
        if r.len() == 1 {
            block.remove(i);
            if block.is_empty() {
                self.blocks.remove(bi);
            }
        } else if o == r.old() {
            block[i] = Run::new(o + 1, r.new_chunk() + 1, r.len() - 1);
        } else if o == r.end() - 1 {
            block[i] = Run::new(r.old(), r.new_chunk(), r.len() - 1);
        } else {
            let head = o - r.old();
            block[i] = Run::new(r.old(), r.new_chunk(), head);
            reserve_some(block);
            block.insert(i + 1, Run::new(o + 1, new + 1, r.len() - head - 1));
            if block.len() > BLOCK_MAX {
                self.split(bi);
            }
        }
        Some(Chunk(new))
    }

    /// Remove `n` exceptions `old..old+n`; returns how many were present.
    pub fn remove_range(&mut self, old: Chunk, n: u64) -> u64 {
        // From the end backwards, as merge does.
        (0..n)
            .rev()
            .filter(|i| self.remove(Chunk(old.0 + i)).is_some())
            .count() as u64
    }

    /// Every run, in origin order.
    pub fn runs(&self) -> impl Iterator<Item = ExceptionRun> + '_ {
        let packed = self.blocks.iter().flatten().map(|r| ExceptionRun {
            old_chunk: Chunk(r.old()),
            new_chunk: Chunk(r.new_chunk()),
            len: r.len(),
        });
        let wide = self.wide.iter().map(|(&o, &n)| ExceptionRun {
            old_chunk: Chunk(o),
            new_chunk: Chunk(n),
            len: 1,
        });
        packed.chain(wide)
    }

    /// The runs that hold any chunk in `first..`, in origin order, starting
    /// at the run containing `first` (if any): a range query that costs
    /// O(log n) to start and O(1) per run (block status, `diff`). Wide-map
    /// entries are merged in origin order.
    pub fn runs_from(&self, first: Chunk) -> impl Iterator<Item = ExceptionRun> + '_ {
        let c = first.0;
        let (bi, ri) = if self.blocks.is_empty() {
            (0, 0)
        } else {
            let bi = self.block_for(c);
            let block = &self.blocks[bi];
            let i = block.partition_point(|r| r.end() <= c);
            (bi, i)
        };
        let packed = self
            .blocks
            .get(bi..)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .flat_map(move |(k, b)| b.get(if k == 0 { ri } else { 0 }..).unwrap_or_default())
            .map(|r| ExceptionRun {
                old_chunk: Chunk(r.old()),
                new_chunk: Chunk(r.new_chunk()),
                len: r.len(),
            });
        let wide = self.wide.range(c..).map(|(&o, &n)| ExceptionRun {
            old_chunk: Chunk(o),
            new_chunk: Chunk(n),
            len: 1,
        });
        MergeRuns {
            a: packed.peekable(),
            b: wide.peekable(),
        }
    }

    /// Every exception `(old, new)`, one per chunk.
    pub fn iter(&self) -> impl Iterator<Item = (Chunk, Chunk)> + '_ {
        self.runs()
            .flat_map(|r| (0..r.len).map(move |i| (r.old_chunk + i, r.new_chunk + i)))
    }
}

/// Two origin-ordered run iterators merged into one (packed runs and the
/// wide map never hold the same chunk).
struct MergeRuns<A: Iterator<Item = ExceptionRun>, B: Iterator<Item = ExceptionRun>> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A: Iterator<Item = ExceptionRun>, B: Iterator<Item = ExceptionRun>> Iterator
    for MergeRuns<A, B>
{
    type Item = ExceptionRun;
    fn next(&mut self) -> Option<ExceptionRun> {
        match (self.a.peek(), self.b.peek()) {
            (Some(x), Some(y)) if y.old_chunk.0 < x.old_chunk.0 => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn run_packing_round_trips() {
        for &(o, n, l) in &[
            (0u64, 1u64, 1u64),
            ((1 << 40) - 257, (1 << 48) - 257, 256),
            (0xAB_CDEF_0123, 0x1234_5678_9ABC, 17),
        ] {
            let r = Run::new(o, n, l);
            assert_eq!((r.old(), r.new_chunk(), r.len()), (o, n, l));
        }
        assert_eq!(std::mem::size_of::<Run>(), 12);
    }

    #[test]
    fn coalesces_both_ways_and_bridges() {
        let mut t = ExceptionTable::new();
        assert!(t.insert(Chunk(10), Chunk(100)));
        assert!(t.insert(Chunk(11), Chunk(101)));
        assert!(t.insert(Chunk(13), Chunk(103)));
        assert_eq!(t.nr_runs(), 2);
        assert!(t.insert(Chunk(12), Chunk(102)));
        assert_eq!(t.nr_runs(), 1);
        assert!(t.insert(Chunk(9), Chunk(99)));
        assert_eq!(t.nr_runs(), 1);
        assert!(!t.insert(Chunk(12), Chunk(5)));
        assert_eq!(t.len(), 5);
        assert_eq!(t.lookup(Chunk(13)), Some(Chunk(103)));
        assert_eq!(t.lookup(Chunk(14)), None);
        // Merge order: from the end.
        assert_eq!(t.remove(Chunk(13)), Some(Chunk(103)));
        assert_eq!(t.remove(Chunk(9)), Some(Chunk(99)));
        assert_eq!(t.remove(Chunk(11)), Some(Chunk(101)));
        assert_eq!(t.nr_runs(), 2);
        assert_eq!(t.remove_range(Chunk(10), 3), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn runs_are_capped_at_256() {
        let mut t = ExceptionTable::new();
        for i in 0..1000 {
            t.insert(Chunk(i), Chunk(i + 5));
        }
        assert_eq!(t.nr_runs(), 4);
        assert_eq!(t.runs().map(|r| r.len).max(), Some(256));
    }

    #[test]
    fn wide_chunks_go_to_the_side_map() {
        let mut t = ExceptionTable::new();
        t.insert(Chunk(u64::MAX - 1), Chunk(3));
        t.insert(Chunk(4), Chunk(u64::MAX >> 4));
        t.insert(Chunk(5), Chunk(7));
        assert_eq!(t.lookup(Chunk(u64::MAX - 1)), Some(Chunk(3)));
        assert_eq!(t.lookup(Chunk(4)), Some(Chunk(u64::MAX >> 4)));
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove(Chunk(4)), Some(Chunk(u64::MAX >> 4)));
        assert_eq!(t.len(), 2);
    }

    /// 1,000,000 scattered exceptions (4 KiB chunks on a 1 TiB origin), in
    /// allocation order as a store hands them over: ≤ 16 bytes each.
    #[test]
    fn memory_per_scattered_exception_is_at_most_16_bytes() {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut olds: Vec<u64> = (0..(1u64 << 28)).step_by(268).take(1_000_000).collect();
        olds.shuffle(&mut rng);
        let recs: Vec<(Chunk, Chunk)> = olds
            .iter()
            .enumerate()
            .map(|(i, &o)| (Chunk(o), Chunk(2 + i as u64 + i as u64 / 256)))
            .collect();
        let mut bulk = ExceptionTable::new();
        bulk.bulk_load(recs.iter().copied());
        let per_bulk = bulk.memory_bytes() as f64 / 1e6;
        let mut inc = ExceptionTable::new();
        for &(o, n) in &recs {
            inc.insert(o, n);
        }
        let per_inc = inc.memory_bytes() as f64 / 1e6;
        println!("exception table: {per_bulk:.2} B/exception (bulk_load), {per_inc:.2} B/exception (insert one by one)");
        assert_eq!(bulk.len(), 1_000_000);
        assert_eq!(inc.len(), 1_000_000);
        assert!(per_bulk <= 16.0, "{per_bulk}");
        assert!(per_inc <= 16.0, "{per_inc}");
        for &(o, n) in recs.iter().step_by(997) {
            assert_eq!(bulk.lookup(o), Some(n));
            assert_eq!(inc.lookup(o), Some(n));
        }
        // Sequential: runs compress 256:1.
        let mut seq = ExceptionTable::new();
        seq.bulk_load((0..1_000_000u64).map(|i| (Chunk(i), Chunk(2 + i))));
        println!(
            "sequential: {:.3} B/exception",
            seq.memory_bytes() as f64 / 1e6
        );
        assert!(seq.memory_bytes() < 100_000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        Lookup(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..3000, 1u64..3000).prop_map(|(o, n)| Op::Insert(o, n)),
            // Consecutive inserts build runs.
            4 => (0u64..3000).prop_map(|o| Op::Insert(o, o + 7)),
            2 => (0u64..3000).prop_map(Op::Remove),
            2 => (0u64..3000).prop_map(Op::Lookup),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_btreemap_model(ops in proptest::collection::vec(op(), 1..3000)) {
            let mut t = ExceptionTable::new();
            let mut m: BTreeMap<u64, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(o, n) => {
                        let fresh = !m.contains_key(&o);
                        prop_assert_eq!(t.insert(Chunk(o), Chunk(n)), fresh);
                        if fresh { m.insert(o, n); }
                    }
                    Op::Remove(o) => {
                        prop_assert_eq!(t.remove(Chunk(o)).map(|c| c.0), m.remove(&o));
                    }
                    Op::Lookup(o) => {
                        prop_assert_eq!(t.lookup(Chunk(o)).map(|c| c.0), m.get(&o).copied());
                    }
                }
                prop_assert_eq!(t.len(), m.len() as u64);
            }
            let all: Vec<(u64, u64)> = t.iter().map(|(o, n)| (o.0, n.0)).collect();
            let want: Vec<(u64, u64)> = m.iter().map(|(&o, &n)| (o, n)).collect();
            prop_assert_eq!(&all, &want);
            // Range queries: the runs from any chunk on, chunk for chunk.
            for from in [0u64, 1, 7, 255, 256, 1000, 2999, 3001] {
                let got: Vec<(u64, u64)> = t
                    .runs_from(Chunk(from))
                    .flat_map(|r| (0..r.len).map(move |i| (r.old_chunk.0 + i, r.new_chunk.0 + i)))
                    .filter(|&(o, _)| o >= from)
                    .collect();
                let exp: Vec<(u64, u64)> = m.range(from..).map(|(&o, &n)| (o, n)).collect();
                prop_assert_eq!(got, exp);
                if let Some(r) = t.runs_from(Chunk(from)).next() {
                    prop_assert!(r.old_chunk.0 + r.len > from);
                }
            }
            let mut b = ExceptionTable::new();
            b.bulk_load(want.iter().map(|&(o, n)| (Chunk(o), Chunk(n))));
            for o in 0..3000 {
                prop_assert_eq!(b.lookup(Chunk(o)).map(|c| c.0), m.get(&o).copied());
            }
        }
    }
}
