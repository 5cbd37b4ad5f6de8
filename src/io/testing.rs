//! Devices for tests: [`FaultyDev`] fails chosen operations with EIO,
//! [`CrashDev`] simulates power loss by keeping what is durable apart from
//! what was only written.

use super::{check_range, BlockDev, MemDev, WriteFlags};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn injected() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// Which operations a [`Fault`] hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    Any,
}

/// One fault rule.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail operations of `kind` that touch `[offset, offset+len)`.
    Range { kind: OpKind, offset: u64, len: u64 },
    /// Fail the `n`th operation of `kind` counted from when the rule was added (0-based).
    Nth { kind: OpKind, n: u64 },
    /// Fail every operation of `kind` from now on.
    Always { kind: OpKind },
}

/// What an operation that matches a [`Fault`] does instead of succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Fails with EIO (the default of [`FaultyDev::add`]).
    Eio,
    /// Fails with ENOSPC (a full filesystem under a sparse file).
    Enospc,
    /// A write lands in part (its first half, in whole 512-byte sectors),
    /// then fails with EIO: a torn write. Other operations fail with EIO.
    Short,
    /// Panics (a buggy device), to test that a panic becomes an error.
    Panic,
    /// Blocks until [`FaultyDev::release`] (a stuck device), then succeeds.
    Stall,
}

struct FaultState {
    rules: Vec<(Fault, Effect, u64)>, // rule, effect, ops of its kind seen since added
    /// Operations blocked by `Effect::Stall` go on when this changes.
    release_epoch: u64,
}

/// Wraps a device and makes operations that match its rules fail (EIO by
/// default), tear, panic or stall.
pub struct FaultyDev<D: BlockDev> {
    inner: D,
    state: Mutex<FaultState>,
    stalled: parking_lot::Condvar,
    injected: AtomicU64,
}

impl<D: BlockDev> FaultyDev<D> {
    pub fn new(inner: D) -> Self {
        FaultyDev {
            inner,
            state: Mutex::new(FaultState {
                rules: Vec::new(),
                release_epoch: 0,
            }),
            stalled: parking_lot::Condvar::new(),
            injected: AtomicU64::new(0),
        }
    }
    /// Fail the operations `f` matches with EIO.
    pub fn add(&self, f: Fault) {
        self.add_with(f, Effect::Eio);
    }
    /// Give the operations `f` matches the effect `e`.
    pub fn add_with(&self, f: Fault, e: Effect) {
        self.state.lock().rules.push((f, e, 0));
    }
    /// Remove every rule and let stalled operations go on.
    pub fn clear(&self) {
        self.state.lock().rules.clear();
        self.release();
    }
    /// Let the operations blocked by [`Effect::Stall`] go on.
    pub fn release(&self) {
        self.state.lock().release_epoch += 1;
        self.stalled.notify_all();
    }
    /// How many operations were failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The effect for this operation, if a rule matches (stalls are
    /// waited out here and count as no effect).
    fn effect(&self, kind: OpKind, offset: u64, len: u64) -> Option<Effect> {
        let mut st = self.state.lock();
        let mut hit: Option<Effect> = None;
        for (rule, effect, seen) in st.rules.iter_mut() {
            let mut fail = false;
            let matches_kind = |k: OpKind| k == OpKind::Any || k == kind;
            match rule {
                Fault::Range {
                    kind: k,
                    offset: o,
                    len: l,
                } => {
                    if matches_kind(*k) && offset < *o + *l && *o < offset + len.max(1) {
                        fail = true;
                    }
                }
                Fault::Nth { kind: k, n } => {
                    if matches_kind(*k) {
                        if *seen == *n {
                            fail = true;
                        }
                        *seen += 1;
                    }
                }
                Fault::Always { kind: k } => {
                    if matches_kind(*k) {
                        fail = true;
                    }
                }
            }
            if fail && hit.is_none() {
                hit = Some(*effect);
            }
        }
        if hit.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        if hit == Some(Effect::Stall) {
            let epoch = st.release_epoch;
            while st.release_epoch == epoch {
                self.stalled.wait(&mut st);
            }
            return None;
        }
        hit
    }

    /// Fail (or panic) if a rule says so.
    fn check(&self, kind: OpKind, offset: u64, len: u64) -> io::Result<()> {
        match self.effect(kind, offset, len) {
            None => Ok(()),
            Some(e) => Err(Self::failure(e)),
        }
    }

    fn failure(e: Effect) -> io::Error {
        match e {
            Effect::Enospc => io::Error::from_raw_os_error(libc::ENOSPC),
            Effect::Panic => panic!("FaultyDev: injected panic"),
            Effect::Eio | Effect::Short | Effect::Stall => injected(),
        }
    }
}

impl<D: BlockDev> BlockDev for FaultyDev<D> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(OpKind::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> io::Result<()> {
        match self.effect(OpKind::Write, offset, buf.len() as u64) {
            None => self.inner.write_at(buf, offset, flags),
            Some(Effect::Short) => {
                let part = (buf.len() / 2) & !511;
                if part > 0 {
                    self.inner.write_at(&buf[..part], offset, flags)?;
                }
                Err(injected())
            }
            Some(e) => Err(Self::failure(e)),
        }
    }
    fn flush(&self) -> io::Result<()> {
        self.check(OpKind::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(OpKind::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        self.check(OpKind::Write, offset, len)?;
        self.inner.write_zeroes(offset, len, flags)
    }
}

struct CrashState {
    /// Current contents: every write lands here at once.
    live: Vec<u8>,
    /// Contents made durable by a completed flush or FUA write.
    durable: Vec<u8>,
    /// Writes not yet covered by a flush, in order: (offset, bytes).
    unflushed: Vec<(u64, Vec<u8>, bool)>,
    /// The device's own power supply (unused when it is in a group).
    power: Power,
}

/// A power supply: counts write/flush operations and cuts power at an armed
/// one: after `crash_after` operations, that one and all later ones fail.
#[derive(Default)]
struct Power {
    ops: u64,
    crash_after: Option<u64>,
    crashed: bool,
}

impl Power {
    /// Count one write/flush, or fail it if power is (now) cut.
    fn tick(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(injected());
        }
        if self.crash_after.is_some_and(|n| self.ops >= n) {
            self.crashed = true;
            return Err(injected());
        }
        self.ops += 1;
        Ok(())
    }
}

/// A device that simulates power loss. Writes land in `live`; a flush makes
/// them durable; a FUA write makes itself durable. [`CrashDev::crash`] returns
/// the durable image: every write not covered by a later flush (or FUA) is
/// lost. [`CrashDev::crash_after`] arms a power cut at the n-th write/flush,
/// after which every operation fails, so a workload can be cut at every point.
pub struct CrashDev {
    st: Mutex<CrashState>,
    /// Shared power: when set, the op counter and the power cut are the
    /// group's (see [`CrashGroup`]).
    group: Option<Arc<CrashGroup>>,
}

/// Several [`CrashDev`]s on one power supply: one write/flush counter across
/// all members, and a power cut that hits them all at once.
#[derive(Default)]
pub struct CrashGroup {
    st: Mutex<Power>,
}

impl CrashGroup {
    pub fn new() -> Arc<CrashGroup> {
        Arc::new(CrashGroup::default())
    }
    /// A member device holding `bytes` (durable and live).
    pub fn device(self: &Arc<Self>, bytes: Vec<u8>) -> Arc<CrashDev> {
        let mut d = CrashDev::from_vec(bytes);
        d.group = Some(self.clone());
        Arc::new(d)
    }
    /// Cut power when the `n`-th write or flush of any member (0-based,
    /// counted from the group's creation) is attempted.
    pub fn crash_after(&self, n: u64) {
        self.st.lock().crash_after = Some(n);
    }
    /// Write and flush operations performed so far by all members.
    pub fn ops(&self) -> u64 {
        self.st.lock().ops
    }
    pub fn has_crashed(&self) -> bool {
        self.st.lock().crashed
    }
    fn tick(&self) -> io::Result<()> {
        self.st.lock().tick()
    }
}

impl CrashDev {
    /// A zeroed device of `len` bytes (durable as zeroes).
    pub fn new(len: u64) -> Self {
        Self::from_vec(vec![0; len as usize])
    }
    /// A device whose durable and live content is `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        CrashDev {
            st: Mutex::new(CrashState {
                durable: bytes.clone(),
                live: bytes,
                unflushed: Vec::new(),
                power: Power::default(),
            }),
            group: None,
        }
    }
    /// Cut power when the `n`-th write or flush (0-based, counted from the
    /// device's creation) is attempted: it and all later operations fail.
    pub fn crash_after(&self, n: u64) {
        self.st.lock().power.crash_after = Some(n);
    }
    /// Write and flush operations performed so far.
    pub fn ops(&self) -> u64 {
        self.st.lock().power.ops
    }
    /// True once the armed power cut happened.
    pub fn has_crashed(&self) -> bool {
        self.st.lock().power.crashed
    }
    /// What survives a power loss now: the durable image.
    pub fn crash(&self) -> Vec<u8> {
        self.st.lock().durable.clone()
    }
    /// The durable image plus the first `keep` unflushed writes (a disk may
    /// persist some of its cache in order before power goes).
    pub fn crash_keeping(&self, keep: usize) -> Vec<u8> {
        let st = self.st.lock();
        let mut img = st.durable.clone();
        for (off, data, _) in st.unflushed.iter().take(keep) {
            let o = *off as usize;
            img[o..o + data.len()].copy_from_slice(data);
        }
        // FUA writes after the kept prefix are durable already: an older
        // cached write must not win over them.
        for (off, data, _) in st.unflushed.iter().skip(keep).filter(|w| w.2) {
            let o = *off as usize;
            img[o..o + data.len()].copy_from_slice(data);
        }
        img
    }
    /// The durable image plus the unflushed writes whose index (0 = the
    /// oldest) `keep` selects, applied in order: a disk that persists its
    /// cache in any order.
    pub fn crash_keeping_where(&self, keep: impl Fn(usize) -> bool) -> Vec<u8> {
        let st = self.st.lock();
        let mut img = st.durable.clone();
        for (i, (off, data, fua)) in st.unflushed.iter().enumerate() {
            if *fua || keep(i) {
                let o = *off as usize;
                img[o..o + data.len()].copy_from_slice(data);
            }
        }
        img
    }
    /// Number of writes not yet covered by a flush.
    pub fn unflushed_writes(&self) -> usize {
        self.st.lock().unflushed.len()
    }
    /// The live contents.
    pub fn live(&self) -> Vec<u8> {
        self.st.lock().live.clone()
    }
    /// A new in-memory device holding the durable image (reopen after a crash).
    pub fn reopen(&self) -> Arc<MemDev> {
        Arc::new(MemDev::from_vec(self.crash()))
    }

    fn tick(&self, st: &mut CrashState) -> io::Result<()> {
        if let Some(g) = &self.group {
            return g.tick();
        }
        st.power.tick()
    }
}

impl BlockDev for CrashDev {
    fn len(&self) -> u64 {
        self.st.lock().live.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.st.lock();
        if st.power.crashed || self.group.as_ref().is_some_and(|g| g.has_crashed()) {
            return Err(injected());
        }
        check_range(offset, buf.len() as u64, st.live.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&st.live[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> io::Result<()> {
        let mut st = self.st.lock();
        check_range(offset, buf.len() as u64, st.live.len() as u64)?;
        self.tick(&mut st)?;
        let o = offset as usize;
        st.live[o..o + buf.len()].copy_from_slice(buf);
        if flags.fua {
            st.durable[o..o + buf.len()].copy_from_slice(buf);
        }
        // Kept even when FUA: a later flush replays the unflushed writes in
        // order, so an older write to the same bytes cannot win over this one.
        st.unflushed.push((offset, buf.to_vec(), flags.fua));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = self.st.lock();
        self.tick(&mut st)?;
        let st = &mut *st;
        for (off, data, _) in st.unflushed.drain(..) {
            let o = off as usize;
            st.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, WriteFlags::NONE)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        let zeroes = vec![0u8; len as usize];
        self.write_at(&zeroes, offset, flags)
    }
}
