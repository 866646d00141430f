//! Per-volume chunk state of a mirror: which chunks must be copied (dirty), which a copier
//! is copying now, and which have a guest write in flight on the source (unsettled).
//!
//! The rules that keep stale data off the target:
//! - a copier takes only chunks that are dirty, not being copied and settled, so its read
//!   of the source never races a guest write that is already on its way to the source;
//! - a guest write that is observed while its chunk is being copied marks the chunk dirty
//!   again, so whatever the copier read is overwritten by a later copy (after the write
//!   has settled) — in `active` mode too, where the write's own mirror write could
//!   otherwise be overtaken by the copier's older data.

use std::collections::HashMap;
use std::ops::Range;

/// A fixed-size bit set.
#[derive(Debug, Clone)]
struct Bits {
    words: Vec<u64>,
}

impl Bits {
    fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
        }
    }
    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets bit `i`; returns true if it was clear.
    fn set(&mut self, i: u64) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        !was
    }
    /// Clears bit `i`; returns true if it was set.
    fn clear(&mut self, i: u64) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w &= !(1 << (i % 64));
        was
    }
}

/// The chunk state of one volume under migration. Callers hold it under a mutex.
#[derive(Debug)]
pub struct ChunkTable {
    granularity_bytes: u64,
    len_bytes: u64,
    chunks: u64,
    dirty: Bits,
    copying: Bits,
    /// Chunks recorded in the job file as about to be written (see `persist`): a guest
    /// write to a chunk not armed waits until its arm record is appended.
    armed: Bits,
    /// Chunks with guest writes observed but not yet finished on the source, and how many.
    unsettled: HashMap<u64, u32>,
    dirty_count: u64,
    copying_count: u64,
    /// Where the next search for work starts (round robin over the volume).
    cursor: u64,
}

impl ChunkTable {
    /// A table for `len_bytes` tracked in chunks of `granularity_bytes` (a power of two), all clean.
    pub fn new(len_bytes: u64, granularity_bytes: u64) -> Self {
        let chunks = len_bytes.div_ceil(granularity_bytes);
        Self {
            granularity_bytes,
            len_bytes,
            chunks,
            dirty: Bits::new(chunks),
            copying: Bits::new(chunks),
            armed: Bits::new(chunks),
            unsettled: HashMap::new(),
            dirty_count: 0,
            copying_count: 0,
            cursor: 0,
        }
    }

    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    /// The chunks that bytes `offset_bytes..offset_bytes+len_bytes` touch.
    pub fn chunks_of(&self, offset_bytes: u64, len_bytes: u64) -> Range<u64> {
        if len_bytes == 0 || offset_bytes >= self.len_bytes {
            return 0..0;
        }
        let end = offset_bytes.saturating_add(len_bytes).min(self.len_bytes);
        offset_bytes / self.granularity_bytes..end.div_ceil(self.granularity_bytes)
    }

    /// The byte range of `chunks` (the last chunk may be short).
    pub fn bytes_of(&self, chunks: &Range<u64>) -> Range<u64> {
        let start = chunks.start * self.granularity_bytes;
        let end = (chunks.end * self.granularity_bytes).min(self.len_bytes);
        start..end
    }

    /// Marks a byte range dirty; returns the bytes newly marked.
    pub fn mark_dirty(&mut self, offset_bytes: u64, len_bytes: u64) -> u64 {
        let mut newly = 0;
        for c in self.chunks_of(offset_bytes, len_bytes) {
            if self.dirty.set(c) {
                self.dirty_count += 1;
                newly += self.chunk_len(c);
            }
        }
        newly
    }

    /// A guest write to the range was observed (its source I/O is about to start). Marks its
    /// chunks dirty when `mark_dirty` (background mode) or when a copier is copying them.
    /// Returns the bytes newly marked dirty.
    pub fn begin_write(&mut self, offset_bytes: u64, len_bytes: u64, mark_dirty: bool) -> u64 {
        let mut newly = 0;
        for c in self.chunks_of(offset_bytes, len_bytes) {
            *self.unsettled.entry(c).or_insert(0) += 1;
            if (mark_dirty || self.copying.get(c)) && self.dirty.set(c) {
                self.dirty_count += 1;
                newly += self.chunk_len(c);
            }
        }
        newly
    }

    /// The source I/O of a write seen by [`begin_write`](Self::begin_write) has finished.
    pub fn end_write(&mut self, offset_bytes: u64, len_bytes: u64) {
        for c in self.chunks_of(offset_bytes, len_bytes) {
            if let Some(n) = self.unsettled.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.unsettled.remove(&c);
                }
            }
        }
    }

    fn eligible(&self, c: u64) -> bool {
        self.dirty.get(c) && !self.copying.get(c) && !self.unsettled.contains_key(&c)
    }

    /// The run that [`take_run`](Self::take_run) would take now, left in place: a copier
    /// books the run's bytes on the speed limit before it takes the run, so that it never
    /// holds chunks while it waits.
    pub fn peek_run(&self, chunks_max: u64) -> Option<Range<u64>> {
        if self.dirty_count == 0 || self.chunks == 0 {
            return None;
        }
        let start = self.find_eligible()?;
        let mut end = start + 1;
        while end < self.chunks && end - start < chunks_max && self.eligible(end) {
            end += 1;
        }
        Some(start..end)
    }

    /// Takes up to `chunks_max` contiguous chunks to copy: marks them copying and clean.
    pub fn take_run(&mut self, chunks_max: u64) -> Option<Range<u64>> {
        let Range { start, end } = self.peek_run(chunks_max)?;
        for c in start..end {
            self.dirty.clear(c);
            self.copying.set(c);
        }
        self.dirty_count -= end - start;
        self.copying_count += end - start;
        self.cursor = if end >= self.chunks { 0 } else { end };
        Some(start..end)
    }

    /// Searches from the cursor (wrapping once) for an eligible chunk, word by word.
    fn find_eligible(&self) -> Option<u64> {
        let words = self.dirty.words.len() as u64;
        let first_word = self.cursor / 64;
        for step in 0..=words {
            let w = (first_word + step) % words;
            let mut bits = self.dirty.words[w as usize] & !self.copying.words[w as usize];
            if step == 0 {
                bits &= u64::MAX << (self.cursor % 64);
            }
            while bits != 0 {
                let c = w * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if c < self.chunks && !self.unsettled.contains_key(&c) {
                    return Some(c);
                }
            }
        }
        None
    }

    /// A copier finished (or gave up on) `run`; on failure the chunks become dirty again.
    pub fn finish_run(&mut self, run: Range<u64>, ok: bool) {
        for c in run {
            if self.copying.clear(c) {
                self.copying_count -= 1;
            }
            if !ok && self.dirty.set(c) {
                self.dirty_count += 1;
            }
        }
    }

    fn chunk_len(&self, c: u64) -> u64 {
        let start = c * self.granularity_bytes;
        (start + self.granularity_bytes).min(self.len_bytes) - start
    }

    /// Bytes still to copy: dirty chunks plus chunks being copied (counted whole).
    pub fn pending_bytes(&self) -> u64 {
        (self.dirty_count + self.copying_count) * self.granularity_bytes
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_count * self.granularity_bytes
    }

    /// True when nothing is dirty or being copied.
    pub fn is_clean(&self) -> bool {
        self.dirty_count == 0 && self.copying_count == 0
    }

    /// A table whose dirty chunks are the set bits of `words` (a bitmap as the job file
    /// holds it; bits past the last chunk are ignored). Returns it and the bytes marked.
    pub fn from_words(len_bytes: u64, granularity_bytes: u64, words: &[u64]) -> (Self, u64) {
        let mut table = Self::new(len_bytes, granularity_bytes);
        let mut marked = 0;
        for c in 0..table.chunks {
            let set = words
                .get((c / 64) as usize)
                .is_some_and(|w| w & (1 << (c % 64)) != 0);
            if set && table.dirty.set(c) {
                table.dirty_count += 1;
                marked += table.chunk_len(c);
            }
        }
        (table, marked)
    }

    /// True when every chunk of `chunks` is armed.
    pub fn is_armed(&self, chunks: &Range<u64>) -> bool {
        chunks.clone().all(|c| self.armed.get(c))
    }

    pub fn set_armed(&mut self, chunks: &Range<u64>) {
        for c in chunks.clone() {
            self.armed.set(c);
        }
    }

    /// What a new job file records, and the start of its interval: the pending chunks
    /// (dirty or being copied) and the armed chunks that have a guest write in flight,
    /// which are all that stays armed (every other armed chunk's writes have ended, so it
    /// is dirty, being copied, or on the target). A chunk in flight but not armed belongs
    /// to a write still waiting to append its arm record: it stays unarmed, so that the
    /// writes after it wait for that record too.
    pub fn snapshot_for_file(&mut self) -> (Vec<u64>, Vec<u64>) {
        let pending = self
            .dirty
            .words
            .iter()
            .zip(&self.copying.words)
            .map(|(d, c)| d | c)
            .collect();
        let mut armed = Bits::new(self.chunks);
        for &c in self.unsettled.keys() {
            if self.armed.get(c) {
                armed.set(c);
            }
        }
        self.armed = armed;
        (pending, self.armed.words.clone())
    }

    /// Counts one more write in flight on `chunks` without marking them: in `active` mode a
    /// guest write stays unsettled until its target write has ended too, so that a chunk
    /// whose target lags its source is always armed in the job file.
    pub fn hold(&mut self, offset_bytes: u64, len_bytes: u64) {
        for c in self.chunks_of(offset_bytes, len_bytes) {
            *self.unsettled.entry(c).or_insert(0) += 1;
        }
    }

    /// True when some guest write is in flight on the source.
    pub fn has_unsettled(&self) -> bool {
        !self.unsettled.is_empty()
    }

    /// True while a copier is copying chunk `c`.
    #[cfg(test)]
    pub(crate) fn is_copying(&self, c: u64) -> bool {
        self.copying.get(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 64 * 1024;

    #[test]
    fn takes_contiguous_runs_round_robin() {
        let mut t = ChunkTable::new(10 * G, G);
        assert_eq!(t.mark_dirty(0, 10 * G), 10 * G);
        assert_eq!(t.take_run(4), Some(0..4));
        assert_eq!(t.take_run(4), Some(4..8));
        assert_eq!(t.take_run(4), Some(8..10));
        assert_eq!(t.take_run(4), None);
        assert!(!t.is_clean());
        t.finish_run(0..4, true);
        t.finish_run(4..8, false);
        t.finish_run(8..10, true);
        assert_eq!(t.dirty_bytes(), 4 * G);
        assert_eq!(t.take_run(16), Some(4..8));
        t.finish_run(4..8, true);
        assert!(t.is_clean());
    }

    #[test]
    fn a_peek_names_the_next_run_and_takes_nothing() {
        let mut t = ChunkTable::new(10 * G, G);
        assert_eq!(t.peek_run(4), None);
        t.mark_dirty(2 * G, 6 * G);
        assert_eq!(t.peek_run(4), Some(2..6));
        assert_eq!(t.peek_run(4), Some(2..6), "a peek changes nothing");
        assert_eq!(t.dirty_bytes(), 6 * G);
        assert_eq!(t.take_run(4), Some(2..6));
        assert_eq!(t.peek_run(4), Some(6..8));
        assert_eq!(t.take_run(1), Some(6..7));
    }

    #[test]
    fn never_hands_out_unsettled_chunks() {
        let mut t = ChunkTable::new(4 * G, G);
        t.mark_dirty(0, 4 * G);
        t.begin_write(G + 5, 10, false);
        assert_eq!(t.take_run(4), Some(0..1));
        assert_eq!(t.take_run(4), Some(2..4));
        assert_eq!(t.take_run(4), None, "chunk 1 has a write in flight");
        t.end_write(G + 5, 10);
        assert_eq!(t.take_run(4), Some(1..2));
    }

    #[test]
    fn a_write_during_a_copy_redirties_the_chunk() {
        let mut t = ChunkTable::new(4 * G, G);
        t.mark_dirty(0, G);
        let run = t.take_run(4);
        assert_eq!(run, Some(0..1));
        assert_eq!(
            t.begin_write(100, 1, false),
            G,
            "active mode still re-marks a chunk being copied"
        );
        t.end_write(100, 1);
        t.finish_run(0..1, true);
        assert_eq!(t.dirty_bytes(), G);
        assert_eq!(
            t.begin_write(2 * G, G, false),
            0,
            "active mode leaves idle chunks clean"
        );
        assert_eq!(
            t.begin_write(3 * G, 1, true),
            G,
            "background mode marks every write"
        );
    }

    #[test]
    fn short_last_chunk() {
        let mut t = ChunkTable::new(G + 512, G);
        assert_eq!(t.mark_dirty(G, 512), 512);
        assert_eq!(t.bytes_of(&(1..2)), G..G + 512);
        assert_eq!(t.chunks_of(0, 10 * G), 0..2);
    }
}
