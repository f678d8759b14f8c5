//! The merge journal: which blocks a failover merge has written into the base, so a merge cut
//! short by a crash resumes where it stopped.

use std::io;
use std::path::Path;

use super::codec::{checksum, le_u32, le_u64};
use super::layer::Geometry;
use super::replica::ReplicaError;

// Merge journal (`merge.journal` in the layers' directory, replaced by rename; it exists
// exactly while a failover merge is unfinished), little-endian:
//
//   0  "COLOMERG"  8  version u32 = 1  12  reserved u32 = 0  16  disk size u64
//   24 block size u64  32  next block to merge u64  40  FNV-1a of bytes 0..40 u64

const JOURNAL: &str = "merge.journal";

/// Whether `dir` holds a merge journal: a failover merge there did not finish.
pub fn merge_unfinished(dir: &Path) -> bool {
    dir.join(JOURNAL).exists()
}
const JOURNAL_TMP: &str = "merge.journal.tmp";
const JOURNAL_MAGIC: &[u8; 8] = b"COLOMERG";
const JOURNAL_VERSION: u32 = 1;
const JOURNAL_LEN: usize = 48;

/// A journal error about `path`.
pub(super) fn journal_err(path: &Path, e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Journal {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// The progress a merge journal in `dir` records, if there is one.
pub(super) fn journal_load(dir: &Path, geo: Geometry) -> Result<Option<u64>, ReplicaError> {
    let path = dir.join(JOURNAL);
    // A temporary journal never renamed into place was never in effect.
    let _ = std::fs::remove_file(dir.join(JOURNAL_TMP));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(journal_err(&path, e)),
    };
    let bad = |why: String| Err(journal_err(&path, why));
    if bytes.len() != JOURNAL_LEN {
        return bad(format!("{} bytes, not {JOURNAL_LEN}", bytes.len()));
    }
    if &bytes[..8] != JOURNAL_MAGIC {
        return bad("not a merge journal".into());
    }
    if le_u64(&bytes, 40) != checksum(&bytes[..40]) {
        return bad("checksum mismatch".into());
    }
    if le_u32(&bytes, 8) != JOURNAL_VERSION || le_u32(&bytes, 12) != 0 {
        return bad(format!("version {}", le_u32(&bytes, 8)));
    }
    let (size, bs, next) = (le_u64(&bytes, 16), le_u64(&bytes, 24), le_u64(&bytes, 32));
    if size != geo.size() || bs != geo.block_size() {
        return bad(format!("made for a {size}-byte disk in {bs}-byte blocks"));
    }
    if next > geo.blocks() {
        return bad(format!("next block {next} past the disk"));
    }
    Ok(Some(next))
}

/// Durably records that blocks before `next` are merged (written to a temporary file,
/// synced, renamed over the journal, directory synced).
pub(super) fn journal_store(dir: &Path, geo: Geometry, next: u64) -> Result<(), ReplicaError> {
    let mut rec = [0u8; JOURNAL_LEN];
    rec[..8].copy_from_slice(JOURNAL_MAGIC);
    rec[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    rec[16..24].copy_from_slice(&geo.size().to_le_bytes());
    rec[24..32].copy_from_slice(&geo.block_size().to_le_bytes());
    rec[32..40].copy_from_slice(&next.to_le_bytes());
    let sum = checksum(&rec[..40]);
    rec[40..48].copy_from_slice(&sum.to_le_bytes());
    let (tmp, path) = (dir.join(JOURNAL_TMP), dir.join(JOURNAL));
    let write = || -> io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        io::Write::write_all(&mut &f, &rec)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| journal_err(&path, e))
}

/// Durably removes the journal: the merge is complete.
pub(super) fn journal_remove(dir: &Path) -> Result<(), ReplicaError> {
    let path = dir.join(JOURNAL);
    std::fs::remove_file(&path)
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| journal_err(&path, e))
}
