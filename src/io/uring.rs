//! Many reads in flight from one thread: an io_uring over a file
//! descriptor and a set of equally sized, aligned buffer slots it owns.
//!
//! [`RingReader::start`] queues a read of one slot's length at an offset
//! into a slot; [`RingReader::wait`] waits until that slot's read is done
//! and [`RingReader::slot`] then borrows its bytes. Reads are submitted in
//! batches and complete in any order; short reads are continued, `EINTR`
//! and `EAGAIN` retried, end of file is `UnexpectedEof` (reads are exact,
//! as everywhere in [`crate::io`]).
//!
//! The kernel writes into a slot while its read is in flight, so the
//! buffers are freed only after every read has completed (`Drop` waits;
//! if waiting fails the buffers are leaked rather than freed under the
//! kernel).
//!
//! io_uring is often unavailable (old kernels, `io_uring_disabled`,
//! containers whose seccomp filter refuses `io_uring_setup`):
//! [`RingReader::new`] fails and callers fall back to threads. Setting
//! `DMSNAP_IO_URING=0` (or `off`) makes it fail on purpose, and so does a
//! build without the `uring` feature (then no ring code is compiled).

#[cfg(feature = "uring")]
pub use ring::RingReader;
#[cfg(not(feature = "uring"))]
pub use stub::RingReader;

/// Environment variable that disables io_uring (`0`, `off`, `no`, `false`).
pub const DISABLE_ENV: &str = "DMSNAP_IO_URING";

/// True unless [`DISABLE_ENV`] turns io_uring off.
pub fn enabled_by_env() -> bool {
    !matches!(
        std::env::var(DISABLE_ENV).as_deref(),
        Ok("0" | "off" | "no" | "false")
    )
}

#[cfg(feature = "uring")]
mod ring {
    use super::{enabled_by_env, DISABLE_ENV};
    use io_uring::{opcode, types, IoUring};
    use std::alloc::Layout;
    use std::io;
    use std::marker::PhantomData;
    use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
    use std::ptr::NonNull;

    /// Submit queued reads once this many wait (or when the caller blocks).
    const SUBMIT_BATCH: usize = 16;

    #[derive(Debug)]
    enum Slot {
        /// No read; the bytes are those of the last completed read (or zero).
        Idle,
        /// A read of `[done, len)` at `offset + done` is queued or in flight.
        Busy {
            offset: u64,
            done: usize,
        },
        /// The read completed and filled the slot.
        Ready,
        Failed(io::Error),
    }

    /// Reads into owned, aligned slots through an io_uring; see the module
    /// docs. Not `Send`: the ring is used from the thread that made it.
    pub struct RingReader<'fd> {
        ring: IoUring,
        fd: RawFd,
        base: NonNull<u8>,
        layout: Layout,
        slot_len: usize,
        stride: usize,
        slots: Vec<Slot>,
        /// Reads queued in the submission ring and not yet submitted.
        queued: usize,
        /// Reads submitted whose completion is not reaped yet.
        in_flight: usize,
        _fd: PhantomData<BorrowedFd<'fd>>,
        _not_send: PhantomData<*mut u8>,
    }

    impl<'fd> RingReader<'fd> {
        /// A ring with `slots` buffers of `slot_len` bytes each, every one
        /// aligned to `align` bytes (a power of two: the device's block size
        /// for O_DIRECT). Fails when io_uring is unavailable or disabled.
        pub fn new(
            fd: BorrowedFd<'fd>,
            slots: usize,
            slot_len: usize,
            align: usize,
        ) -> io::Result<Self> {
            if !enabled_by_env() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring disabled by {DISABLE_ENV}"),
                ));
            }
            let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
            if slots == 0 || slot_len == 0 || u32::try_from(slot_len).is_err() {
                return Err(bad("a ring reader needs slots of 1 byte to 4 GiB"));
            }
            let align = align.max(1);
            if !align.is_power_of_two() {
                return Err(bad("slot alignment must be a power of two"));
            }
            let stride = slot_len
                .checked_next_multiple_of(align)
                .ok_or_else(|| bad("slot size overflows"))?;
            let total = stride
                .checked_mul(slots)
                .ok_or_else(|| bad("ring buffer size overflows"))?;
            let entries = u32::try_from(slots.next_power_of_two())
                .map_err(|_| bad("too many slots"))?
                .min(4096);
            let ring = make_ring(entries)?;
            let layout =
                Layout::from_size_align(total, align).map_err(|_| bad("bad buffer layout"))?;
            // SAFETY: the layout has a non-zero size (slots and slot_len are
            // non-zero). Zeroed: a slot is readable (as zeroes) before any read.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            let Some(base) = NonNull::new(ptr) else {
                std::alloc::handle_alloc_error(layout);
            };
            Ok(RingReader {
                ring,
                fd: fd.as_raw_fd(),
                base,
                layout,
                slot_len,
                stride,
                slots: (0..slots).map(|_| Slot::Idle).collect(),
                queued: 0,
                in_flight: 0,
                _fd: PhantomData,
                _not_send: PhantomData,
            })
        }

        /// Number of slots.
        pub fn slots(&self) -> usize {
            self.slots.len()
        }

        /// Queue a read of one slot's length at `offset` into `slot`. A slot
        /// still busy is waited for first (its result dropped).
        pub fn start(&mut self, slot: usize, offset: u64) -> io::Result<()> {
            if slot >= self.slots.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("slot {slot} of {}", self.slots.len()),
                ));
            }
            if matches!(self.slots[slot], Slot::Busy { .. }) {
                let _ = self.wait(slot);
            }
            self.slots[slot] = Slot::Busy { offset, done: 0 };
            self.push(slot)?;
            if self.queued >= SUBMIT_BATCH {
                self.submit()?;
            }
            Ok(())
        }

        /// Wait until the read into `slot` is done: `Ok` when the slot holds
        /// the bytes asked for, the read's error otherwise. The slot is idle
        /// afterwards (a second `wait` returns `Ok` with the same bytes).
        pub fn wait(&mut self, slot: usize) -> io::Result<()> {
            loop {
                match self.slots.get(slot) {
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("slot {slot} of {}", self.slots.len()),
                        ))
                    }
                    Some(Slot::Busy { .. }) => {}
                    Some(_) => break,
                }
                self.reap()?;
                if !matches!(self.slots[slot], Slot::Busy { .. }) {
                    break;
                }
                // Sleep until half of what is out has completed, not just the
                // one read wanted: the device keeps the other half queued,
                // and one wakeup then serves many slots (wakeups are what
                // cost on a busy machine).
                let want = ((self.queued + self.in_flight) / 2).max(1);
                self.enter(want)?;
                self.reap()?;
            }
            // Reads queued meanwhile go to the device now, not at the next block.
            if self.queued > 0 {
                self.submit()?;
            }
            match std::mem::replace(&mut self.slots[slot], Slot::Idle) {
                Slot::Failed(e) => Err(e),
                _ => Ok(()),
            }
        }

        /// The bytes of `slot`; `None` while a read into it is in flight.
        pub fn slot(&self, slot: usize) -> Option<&[u8]> {
            match self.slots.get(slot)? {
                Slot::Busy { .. } => None,
                _ => {
                    // SAFETY: the slot lies inside the allocation (slot <
                    // slots, stride * slots bytes allocated, slot_len <=
                    // stride), all of it initialised (zeroed at allocation).
                    // No read is in flight into it, and new reads are only
                    // queued through `&mut self`, which this borrow excludes.
                    Some(unsafe {
                        std::slice::from_raw_parts(
                            self.base.as_ptr().add(slot * self.stride),
                            self.slot_len,
                        )
                    })
                }
            }
        }

        /// Queue the (rest of the) read of a busy slot.
        fn push(&mut self, slot: usize) -> io::Result<()> {
            let Slot::Busy { offset, done } = self.slots[slot] else {
                return Ok(());
            };
            // SAFETY: in bounds of the allocation (see `slot`), done < slot_len.
            let buf = unsafe { self.base.as_ptr().add(slot * self.stride + done) };
            let sqe = opcode::Read::new(types::Fd(self.fd), buf, (self.slot_len - done) as u32)
                .offset(offset + done as u64)
                .build()
                .user_data(slot as u64);
            loop {
                // SAFETY: the buffer stays valid and untouched until the read
                // completes: the slot is Busy until its completion is reaped,
                // `slot` refuses to borrow a Busy slot, and Drop waits for
                // every read before freeing. The fd outlives the ring ('fd).
                let pushed = unsafe { self.ring.submission().push(&sqe) };
                if pushed.is_ok() {
                    break;
                }
                // The submission ring is full: hand it to the kernel.
                self.submit()?;
            }
            self.queued += 1;
            Ok(())
        }

        fn submit(&mut self) -> io::Result<()> {
            self.enter(0)
        }

        /// Submit what is queued and wait for `want` completions.
        fn enter(&mut self, want: usize) -> io::Result<()> {
            loop {
                match self.ring.submit_and_wait(want) {
                    Ok(n) => {
                        let n = n.min(self.queued);
                        self.queued -= n;
                        self.in_flight += n;
                        return Ok(());
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    // EBUSY: the completion ring is full; reaping frees it.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && want == 0 => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }

        /// Take every available completion and update its slot.
        fn reap(&mut self) -> io::Result<()> {
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (slot, res) in done {
                self.in_flight = self.in_flight.saturating_sub(1);
                let Some(s) = self.slots.get_mut(slot as usize) else {
                    continue;
                };
                let Slot::Busy { offset, done } = *s else {
                    continue;
                };
                if res < 0 {
                    if res == -libc::EINTR || res == -libc::EAGAIN {
                        self.push(slot as usize)?;
                    } else {
                        *s = Slot::Failed(io::Error::from_raw_os_error(-res));
                    }
                } else if res == 0 {
                    *s = Slot::Failed(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "read of {} bytes at offset {} ended at end of file",
                            self.slot_len - done,
                            offset + done as u64
                        ),
                    ));
                } else {
                    let done = done + res as usize;
                    if done >= self.slot_len {
                        *s = Slot::Ready;
                    } else {
                        *s = Slot::Busy { offset, done };
                        self.push(slot as usize)?;
                    }
                }
            }
            Ok(())
        }
    }

    /// A plain io_uring of `entries` entries (the completion ring twice
    /// that). Setup flags such as `DEFER_TASKRUN` were measured: no gain for
    /// a load, and older kernels refuse them.
    fn make_ring(entries: u32) -> io::Result<IoUring> {
        IoUring::new(entries)
    }

    impl Drop for RingReader<'_> {
        fn drop(&mut self) {
            // Reads still out are not continued when they complete short.
            for s in &mut self.slots {
                if matches!(s, Slot::Busy { .. }) {
                    *s = Slot::Idle;
                }
            }
            let mut drained = true;
            while self.queued + self.in_flight > 0 {
                if self.enter(1).and_then(|()| self.reap()).is_err() {
                    drained = false;
                    break;
                }
            }
            if drained {
                // SAFETY: allocated in `new` with exactly this layout; no read
                // is in flight any more, so the kernel no longer writes to it.
                unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
            } else {
                tracing::warn!("io_uring reads did not drain; leaking their buffers");
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;

        /// A file whose every 4-byte word holds its own offset.
        fn patterned(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
            let bytes: Vec<u8> = (0..len as u32 / 4)
                .flat_map(|w| (w * 4).to_le_bytes())
                .collect();
            let f = tempfile::NamedTempFile::new().unwrap();
            f.as_file().write_all_at(&bytes, 0).unwrap();
            (f, bytes)
        }

        #[test]
        fn reads_land_in_their_slots_and_slots_are_reused() {
            let (f, bytes) = patterned(1 << 20);
            let file = f.as_file();
            let mut r = RingReader::new(file.as_fd(), 8, 4096, 4096).expect("io_uring available");
            assert_eq!(
                r.slot(3).unwrap(),
                &[0u8; 4096][..],
                "idle slots read as zeroes"
            );
            // 200 reads through 8 slots, a window of 8 in flight, consumed in order.
            let offset = |i: usize| ((i * 37) % 250 * 4096) as u64;
            for i in 0..8 {
                r.start(i, offset(i)).unwrap();
            }
            for i in 0..200 {
                let s = i % 8;
                r.wait(s).unwrap();
                let o = offset(i) as usize;
                assert_eq!(r.slot(s).unwrap(), &bytes[o..o + 4096], "read {i}");
                if i + 8 < 200 {
                    r.start(s, offset(i + 8)).unwrap();
                }
            }
            assert_eq!(r.queued + r.in_flight, 0);
        }

        #[test]
        fn a_read_past_the_end_of_the_file_is_unexpected_eof() {
            let (f, bytes) = patterned(10_000);
            let mut r = RingReader::new(f.as_file().as_fd(), 2, 4096, 512).unwrap();
            // Slot 0 ends short (continued, then end of file); slot 1 is whole.
            r.start(0, 8192).unwrap();
            r.start(1, 4096).unwrap();
            let e = r.wait(0).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            r.wait(1).unwrap();
            assert_eq!(r.slot(1).unwrap(), &bytes[4096..8192]);
        }

        #[test]
        fn restarting_a_busy_slot_and_dropping_with_reads_out_are_safe() {
            let (f, bytes) = patterned(1 << 20);
            let mut r = RingReader::new(f.as_file().as_fd(), 4, 65536, 4096).unwrap();
            r.start(0, 0).unwrap();
            r.start(0, 65536).unwrap();
            r.wait(0).unwrap();
            assert_eq!(r.slot(0).unwrap(), &bytes[65536..131072]);
            for s in 0..4 {
                r.start(s, (s as u64) << 16).unwrap();
            }
            // Dropped with four reads queued or in flight: Drop drains them.
            drop(r);
        }

        #[test]
        fn bad_geometry_is_refused() {
            let (f, _) = patterned(4096);
            let fd = f.as_file().as_fd();
            for (slots, len, align) in [(0, 4096, 4096), (1, 0, 4096), (1, 4096, 3000)] {
                let e = RingReader::new(fd, slots, len, align)
                    .err()
                    .expect("refused");
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            }
            let mut r = RingReader::new(fd, 1, 512, 512).unwrap();
            assert_eq!(
                r.start(1, 0).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(r.wait(1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
            assert!(r.slot(1).is_none());
        }
    }
}

/// Without the `uring` feature: a reader that cannot be made.
#[cfg(not(feature = "uring"))]
mod stub {
    use std::io;
    use std::marker::PhantomData;
    use std::os::fd::BorrowedFd;

    enum Never {}

    /// Never exists: [`RingReader::new`] always fails.
    pub struct RingReader<'fd> {
        never: Never,
        _fd: PhantomData<BorrowedFd<'fd>>,
    }

    impl<'fd> RingReader<'fd> {
        pub fn new(_: BorrowedFd<'fd>, _: usize, _: usize, _: usize) -> io::Result<Self> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "built without the uring feature",
            ))
        }
        pub fn slots(&self) -> usize {
            match self.never {}
        }
        pub fn start(&mut self, _: usize, _: u64) -> io::Result<()> {
            match self.never {}
        }
        pub fn wait(&mut self, _: usize) -> io::Result<()> {
            match self.never {}
        }
        pub fn slot(&self, _: usize) -> Option<&[u8]> {
            match self.never {}
        }
    }
}
