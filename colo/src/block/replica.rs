//! The secondary's replicated disk: the base (the primary's writes), the hidden layer (what
//! those writes overwrote since the last checkpoint) and the active layer (the SVM's writes).
//!
//! Why each rule holds the SVM at "the disk at the last checkpoint plus its own writes":
//! - a primary write first copies every block it touches to hidden, unless hidden already
//!   has it (copied since the checkpoint: hidden keeps the checkpoint's content, never a
//!   later one) or active has it (the SVM's own block hides both lower layers until the next
//!   checkpoint empties them together);
//! - the SVM reads the topmost layer holding a block: active, hidden, base;
//! - an SVM write into a block active lacks fills the rest of the block from the layers below
//!   first, since a present block hides them.
//!
//! Failover merges the layers into the base in one ascending pass, a block taking active's
//! content if active has it, else hidden's: the same result as merging hidden then active,
//! with each base block written once. The SVM's view is the same at every step of the merge,
//! so a merge may be repeated from any earlier point: the SVM reads through the layers until
//! it is complete, and its first write completes it. With file-backed layers, the base and
//! the layers are synced before a journal records that the merge began, progress is recorded
//! only after the base is synced, and the journal is removed (after a last sync) before the
//! layers are emptied; a reopened disk that finds the journal resumes from the progress it
//! records (the journal's format is in [`super`]), even after a power loss.
//!
//! A guest flush is not passed on while replicating: until failover the SVM's disk is
//! speculative (a secondary that crashes is resynchronised from the primary), and failover
//! makes it durable in one go.

use std::io;
use std::path::PathBuf;

use devices::virtio::block::BlockBackend;

use super::journal::{journal_load, journal_remove, journal_store};
use super::layer::{Geometry, Layer, LayerError, Segment};
use super::DEFAULT_BLOCK_SIZE;

/// Errors of the replicated disk.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The hidden or active layer failed.
    #[error("{layer} layer: {source}")]
    Layer {
        /// Which layer.
        layer: &'static str,
        /// The error.
        #[source]
        source: LayerError,
    },
    /// The disk's size and the block size do not go together.
    #[error("disk geometry: {0}")]
    Geometry(#[source] LayerError),
    /// The base disk failed.
    #[error("base disk: {0}")]
    Base(#[source] io::Error),
    /// A range outside the disk.
    #[error("{len} bytes at {offset} are outside the {size}-byte disk")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// An operation of the replicating disk after failover began.
    #[error("{0} after failover began")]
    NotReplicating(&'static str),
    /// The layers' directory cannot be created.
    #[error("layers directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The merge journal is unreadable or not this disk's.
    #[error("merge journal {path}: {why}")]
    Journal {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A thread panicked while holding the disk.
    #[error("the replicated disk's lock is poisoned")]
    Poisoned,
}

impl From<ReplicaError> for io::Error {
    fn from(e: ReplicaError) -> Self {
        let kind = match &e {
            ReplicaError::Base(io) => io.kind(),
            ReplicaError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

fn hidden_err(source: LayerError) -> ReplicaError {
    ReplicaError::Layer {
        layer: "hidden",
        source,
    }
}

fn active_err(source: LayerError) -> ReplicaError {
    ReplicaError::Layer {
        layer: "active",
        source,
    }
}

/// Where the hidden and active layers live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LayerStore {
    /// In memory: lost with the process.
    #[default]
    Memory,
    /// Sparse files in this directory (created if missing), with the merge journal.
    Files(PathBuf),
}

/// How to build a [`ReplicaDisk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Block size of the layers.
    pub block_size: u64,
    /// Where the layers live.
    pub layers: LayerStore,
    /// Merged blocks between two progress records of the journal (each syncs the base).
    pub progress_every: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            layers: LayerStore::Memory,
            progress_every: 1024,
        }
    }
}

/// Where the disk is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Taking the primary's writes; the SVM runs on the layers.
    Replicating,
    /// Failover began; blocks from `next` on are still to be merged into the base.
    Merging {
        /// First block not known to be merged.
        next: u64,
    },
    /// Failed over: the base alone.
    Alone,
}

/// Counters for the status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStats {
    /// Blocks in the hidden layer.
    pub hidden_blocks: u64,
    /// Bytes the hidden layer holds.
    pub hidden_bytes: u64,
    /// Blocks in the active layer.
    pub active_blocks: u64,
    /// Bytes the active layer holds.
    pub active_bytes: u64,
    /// Blocks copied from the base to hidden before a primary write.
    pub copy_before_writes: u64,
    /// Checkpoints applied.
    pub checkpoints: u64,
    /// Blocks written into the base by failover merges.
    pub merged_blocks: u64,
    /// Failover merges completed.
    pub merges: u64,
}

/// The secondary's disk: base, hidden and active.
pub struct ReplicaDisk<B> {
    base: B,
    geo: Geometry,
    hidden: Layer,
    active: Layer,
    state: ReplicaState,
    /// The layers' directory when file-backed (where the journal lives).
    dir: Option<PathBuf>,
    progress_every: u64,
    stats: ReplicaStats,
    /// One block, for copies between layers.
    scratch: Vec<u8>,
}

impl<B: BlockBackend> ReplicaDisk<B> {
    /// The disk over `base`. With file-backed layers, a merge journal left by a failover
    /// that did not finish means the layers are reopened and the disk is
    /// [`ReplicaState::Merging`] ([`Self::failover`] finishes it); otherwise the layers start
    /// empty.
    pub fn open(base: B, config: &ReplicaConfig) -> Result<Self, ReplicaError> {
        let geo = Geometry::new(base.size(), config.block_size).map_err(ReplicaError::Geometry)?;
        let (mut hidden, mut active) = (Layer::memory(geo), Layer::memory(geo));
        let mut state = ReplicaState::Replicating;
        let dir = match &config.layers {
            LayerStore::Memory => None,
            LayerStore::Files(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| ReplicaError::Dir {
                    path: dir.clone(),
                    source,
                })?;
                let paths = |name: &str| {
                    (
                        dir.join(format!("{name}.data")),
                        dir.join(format!("{name}.index")),
                    )
                };
                let ((hd, hi), (ad, ai)) = (paths("hidden"), paths("active"));
                if let Some(next) = journal_load(dir, geo)? {
                    hidden = Layer::open(geo, &hd, &hi).map_err(hidden_err)?;
                    active = Layer::open(geo, &ad, &ai).map_err(active_err)?;
                    state = ReplicaState::Merging { next };
                } else {
                    hidden = Layer::create(geo, &hd, &hi).map_err(hidden_err)?;
                    active = Layer::create(geo, &ad, &ai).map_err(active_err)?;
                }
                Some(dir.clone())
            }
        };
        Ok(Self {
            base,
            geo,
            hidden,
            active,
            state,
            dir,
            progress_every: config.progress_every.max(1),
            stats: ReplicaStats::default(),
            scratch: vec![0; geo.bs()],
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.geo.size()
    }

    /// The disk geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Where the disk is in its life.
    pub fn state(&self) -> ReplicaState {
        self.state
    }

    /// Counters, with the layers' current sizes.
    pub fn stats(&self) -> ReplicaStats {
        ReplicaStats {
            hidden_blocks: self.hidden.block_count(),
            hidden_bytes: self.hidden.bytes_used(),
            active_blocks: self.active.block_count(),
            active_bytes: self.active.bytes_used(),
            ..self.stats
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        if self.geo.contains(offset, len) {
            Ok(())
        } else {
            Err(ReplicaError::OutOfRange {
                offset,
                len,
                size: self.geo.size(),
            })
        }
    }

    fn replicating(&self, what: &'static str) -> Result<(), ReplicaError> {
        match self.state {
            ReplicaState::Replicating => Ok(()),
            _ => Err(ReplicaError::NotReplicating(what)),
        }
    }

    /// Applies the primary's write of `data` at `offset` to the base, after copying the
    /// blocks it overwrites to hidden where the SVM still needs them.
    pub fn primary_write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        self.replicating("a primary write")?;
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.copy_before_write(offset, data.len() as u64)?;
        self.base.write_at(offset, data).map_err(ReplicaError::Base)
    }

    /// Applies the primary's zeroing (or discard) of `len` bytes at `offset`, like
    /// [`Self::primary_write`].
    pub fn primary_write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.replicating("a primary write")?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.copy_before_write(offset, len)?;
        self.base
            .write_zeroes(offset, len)
            .map_err(ReplicaError::Base)
    }

    /// Writes the primary's `data` at `offset` straight into the base: the initial sync and
    /// the primary's writes before the first checkpoint, when the SVM has never run and its
    /// view is the base itself (a copy-before-write would only fill the hidden layer with
    /// what the first checkpoint drops).
    pub fn seed_write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        self.seeding()?;
        self.check(offset, data.len() as u64)?;
        self.base.write_at(offset, data).map_err(ReplicaError::Base)
    }

    /// Zeroes `len` bytes at `offset` of the base, like [`Self::seed_write`].
    pub fn seed_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.seeding()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.base
            .write_zeroes(offset, len)
            .map_err(ReplicaError::Base)
    }

    fn seeding(&self) -> Result<(), ReplicaError> {
        self.replicating("seeding the base")?;
        if self.stats.checkpoints > 0 {
            return Err(ReplicaError::NotReplicating(
                "seeding the base after the first checkpoint",
            ));
        }
        Ok(())
    }

    fn copy_before_write(&mut self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        for seg in self.geo.segments(offset, len) {
            let b = seg.block;
            if self.hidden.has(b) || self.active.has(b) {
                continue;
            }
            let valid = self.geo.valid(b);
            self.scratch[valid..].fill(0);
            self.base
                .read_at(self.geo.start(b), &mut self.scratch[..valid])
                .map_err(ReplicaError::Base)?;
            self.hidden.write(b, 0, &self.scratch).map_err(hidden_err)?;
            self.stats.copy_before_writes += 1;
        }
        Ok(())
    }

    /// The SVM reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        self.check(offset, buf.len() as u64)?;
        if self.state == ReplicaState::Alone {
            return self.base.read_at(offset, buf).map_err(ReplicaError::Base);
        }
        // Consecutive segments only the base holds are read in one go: (request pos, len).
        let mut run: Option<(usize, usize)> = None;
        for Segment {
            block,
            at,
            len,
            pos,
        } in self.geo.segments(offset, buf.len() as u64)
        {
            let out = &mut buf[pos..pos + len];
            if self.active.has(block) {
                self.active.read(block, at, out).map_err(active_err)?;
            } else if self.hidden.has(block) {
                self.hidden.read(block, at, out).map_err(hidden_err)?;
            } else {
                run = match run {
                    Some((start, n)) => Some((start, n + len)),
                    None => Some((pos, len)),
                };
                continue;
            }
            if let Some((start, n)) = run.take() {
                let dst = &mut buf[start..start + n];
                self.base
                    .read_at(offset + start as u64, dst)
                    .map_err(ReplicaError::Base)?;
            }
        }
        if let Some((start, n)) = run {
            let dst = &mut buf[start..start + n];
            self.base
                .read_at(offset + start as u64, dst)
                .map_err(ReplicaError::Base)?;
        }
        Ok(())
    }

    /// The SVM writes `data` at `offset`: into active while replicating, else into the base
    /// (finishing a pending merge first).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        self.check(offset, data.len() as u64)?;
        if self.state != ReplicaState::Replicating {
            self.merge()?;
            return self.base.write_at(offset, data).map_err(ReplicaError::Base);
        }
        for seg in self.geo.segments(offset, data.len() as u64) {
            self.write_active(seg, Some(&data[seg.pos..seg.pos + seg.len]))?;
        }
        Ok(())
    }

    /// The SVM zeroes `len` bytes at `offset` (`discard` passes a discard on to the base
    /// once failed over; while replicating both become zeroes in active).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<(), ReplicaError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.state != ReplicaState::Replicating {
            self.merge()?;
            let r = if discard {
                self.base.discard(offset, len)
            } else {
                self.base.write_zeroes(offset, len)
            };
            return r.map_err(ReplicaError::Base);
        }
        for seg in self.geo.segments(offset, len) {
            self.write_active(seg, None)?;
        }
        Ok(())
    }

    /// Writes one segment into active (`None`: zeroes), filling an absent block from below.
    fn write_active(&mut self, seg: Segment, data: Option<&[u8]>) -> Result<(), ReplicaError> {
        let b = seg.block;
        let whole = seg.at == 0 && seg.len == self.geo.valid(b);
        if whole && data.is_none() {
            return self.active.write_zeroes(b).map_err(active_err);
        }
        if self.active.has(b) && !whole {
            return match data {
                Some(d) => self.active.write(b, seg.at, d),
                None => self.active.write(b, seg.at, &vec![0u8; seg.len]),
            }
            .map_err(active_err);
        }
        // A new block for active: what the SVM sees of it now, then the segment over it.
        let valid = self.geo.valid(b);
        let mut block = std::mem::take(&mut self.scratch);
        block.fill(0);
        let filled = if whole {
            Ok(())
        } else if self.hidden.has(b) {
            self.hidden.read(b, 0, &mut block).map_err(hidden_err)
        } else {
            let base = &mut block[..valid];
            self.base
                .read_at(self.geo.start(b), base)
                .map_err(ReplicaError::Base)
        };
        let r = filled.and_then(|()| {
            let dst = &mut block[seg.at..seg.at + seg.len];
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
            self.active.write(b, 0, &block).map_err(active_err)
        });
        self.scratch = block;
        r
    }

    /// The SVM's flush: passed on to the base once failed over, nothing while replicating
    /// (see the module docs).
    pub fn flush(&mut self) -> Result<(), ReplicaError> {
        match self.state {
            ReplicaState::Alone => self.base.flush().map_err(ReplicaError::Base),
            _ => Ok(()),
        }
    }

    /// The primary's flush, passed on to the base.
    pub fn primary_flush(&mut self) -> Result<(), ReplicaError> {
        self.replicating("a primary flush")?;
        self.base.flush().map_err(ReplicaError::Base)
    }

    /// A checkpoint was applied: the SVM's disk is the primary's again (the base), so both
    /// layers are emptied. A failed checkpoint leaves the SVM's disk undefined: replication
    /// must stop.
    pub fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        self.replicating("a checkpoint")?;
        self.active.clear().map_err(active_err)?;
        self.hidden.clear().map_err(hidden_err)?;
        self.stats.checkpoints += 1;
        Ok(())
    }

    /// Makes the SVM's view the base's content and leaves the disk on the base alone.
    /// Resumes a merge an earlier call (or a crashed process) left unfinished; does nothing
    /// once failed over.
    pub fn failover(&mut self) -> Result<(), ReplicaError> {
        if self.state == ReplicaState::Replicating {
            if let Some(dir) = &self.dir {
                // Everything the SVM's view rests on is durable before the journal says the
                // merge began: the base (the primary's writes, which the SVM may have flushed
                // since) and the layers.
                self.base.flush().map_err(ReplicaError::Base)?;
                self.hidden.sync().map_err(hidden_err)?;
                self.active.sync().map_err(active_err)?;
                journal_store(dir, self.geo, 0)?;
            }
            self.state = ReplicaState::Merging { next: 0 };
        }
        self.merge()
    }

    /// Merges the layers into the base from the current progress on, then empties them.
    fn merge(&mut self) -> Result<(), ReplicaError> {
        let ReplicaState::Merging { mut next } = self.state else {
            return Ok(());
        };
        let mut since_record = 0;
        loop {
            let b = match (self.hidden.next_block(next), self.active.next_block(next)) {
                (Some(h), Some(a)) => h.min(a),
                (h, a) => match h.or(a) {
                    Some(b) => b,
                    None => break,
                },
            };
            self.merge_block(b)?;
            next = b + 1;
            self.state = ReplicaState::Merging { next };
            self.stats.merged_blocks += 1;
            since_record += 1;
            if let (Some(dir), true) = (&self.dir, since_record >= self.progress_every) {
                self.base.flush().map_err(ReplicaError::Base)?;
                journal_store(dir, self.geo, next)?;
                since_record = 0;
            }
        }
        self.base.flush().map_err(ReplicaError::Base)?;
        if let Some(dir) = &self.dir {
            journal_remove(dir)?;
        }
        self.state = ReplicaState::Alone;
        self.stats.merges += 1;
        // The merge is complete and durable: emptying the layers only frees room.
        for (layer, name) in [(&mut self.active, "active"), (&mut self.hidden, "hidden")] {
            if let Err(e) = layer.clear() {
                log::warn!("COLO block: emptying the {name} layer after failover: {e}");
            }
        }
        Ok(())
    }

    fn merge_block(&mut self, b: u64) -> Result<(), ReplicaError> {
        let (layer, err): (&Layer, fn(LayerError) -> ReplicaError) = if self.active.has(b) {
            (&self.active, active_err)
        } else {
            (&self.hidden, hidden_err)
        };
        let (start, valid) = (self.geo.start(b), self.geo.valid(b));
        if layer.is_zero(b) {
            return self
                .base
                .write_zeroes(start, valid as u64)
                .map_err(ReplicaError::Base);
        }
        layer.read(b, 0, &mut self.scratch).map_err(err)?;
        self.base
            .write_at(start, &self.scratch[..valid])
            .map_err(ReplicaError::Base)
    }
}
