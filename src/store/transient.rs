//! The transient store (`N`, `dm-snap-transient.c`): chunks handed out from
//! sector 0, nothing written but data, nothing read back at activation.

use super::{ExceptionStore, MergeRun, StoreError, SyncJob, Usage};
use crate::format::DiskException;
use crate::units::{Chunk, ChunkSize, Sector};

/// A store whose exceptions live only in memory.
pub struct TransientStore {
    chunk_size: ChunkSize,
    cow_sectors: Sector,
    /// Next free sector (kernel `tc->next_free`).
    next_free: Sector,
    valid: bool,
    /// Records so far (all "durable": there is nothing to write).
    recorded: u64,
}

impl TransientStore {
    pub fn new(chunk_size: ChunkSize, cow_bytes: u64) -> Self {
        TransientStore {
            chunk_size,
            cow_sectors: Sector::from_bytes(cow_bytes),
            next_free: Sector(0),
            valid: true,
            recorded: 0,
        }
    }
}

impl ExceptionStore for TransientStore {
    fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }
    fn is_valid(&self) -> bool {
        self.valid
    }
    fn read_metadata(&mut self, _sink: &mut dyn FnMut(DiskException)) -> Result<(), StoreError> {
        Ok(())
    }
    /// `transient_prepare_exception`.
    fn prepare_exception(&mut self) -> Result<Chunk, StoreError> {
        if self.cow_sectors.0 < self.next_free.0 + self.chunk_size.sectors() {
            return Err(StoreError::Full {
                chunk_size: self.chunk_size,
                usage: self.usage(),
            });
        }
        let c = self.chunk_size.chunk_of_sector(self.next_free);
        self.next_free.0 += self.chunk_size.sectors();
        Ok(c)
    }
    /// Nothing to write: a record is as durable as it will ever be.
    fn record_exception(&mut self, _e: DiskException, valid: bool) -> Result<u64, StoreError> {
        if !valid {
            self.valid = false;
        }
        if !self.valid {
            return Err(StoreError::Invalid);
        }
        self.recorded += 1;
        Ok(self.recorded)
    }
    fn durable_seq(&self) -> u64 {
        self.recorded
    }
    fn recorded_seq(&self) -> u64 {
        self.recorded
    }
    fn has_full_areas(&self) -> bool {
        false
    }
    fn start_sync(&mut self) -> Option<SyncJob> {
        None
    }
    fn finish_sync(&mut self, _upto: u64, _result: Result<(), StoreError>) {}
    fn prepare_merge_batch(&mut self, _max_chunks: u64) -> Result<Vec<MergeRun>, StoreError> {
        Err(StoreError::MergeUnsupported)
    }
    fn commit_merge_batch(&mut self, _nr_merged: u64) -> Result<(), StoreError> {
        Err(StoreError::MergeUnsupported)
    }
    fn drop_snapshot(&mut self) -> Result<(), StoreError> {
        self.valid = false;
        Ok(())
    }
    /// `transient_usage`: metadata is always 0.
    fn usage(&self) -> Usage {
        Usage {
            allocated: self.next_free,
            total: self.cow_sectors,
            metadata: Sector(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_from_zero_until_full() {
        let cs = ChunkSize::from_sectors(8).expect("valid");
        let mut s = TransientStore::new(cs, 3 * 4096 + 100);
        assert_eq!(s.prepare_exception().ok(), Some(Chunk(0)));
        assert_eq!(s.prepare_exception().ok(), Some(Chunk(1)));
        assert_eq!(s.prepare_exception().ok(), Some(Chunk(2)));
        assert!(matches!(
            s.prepare_exception(),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(s.usage().to_string(), "24/24 0");
    }
}
