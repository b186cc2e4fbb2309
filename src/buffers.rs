//! Large buffers that are reused instead of freed, and what the process's allocator does with
//! memory that is freed.
//!
//! A fresh allocation per chunk is not free at pipeline sizes (a quarter of a MiB and up):
//! the allocator hands large blocks back to the kernel and takes them again, so each new
//! buffer costs page faults and the kernel's zeroing of every page, and a buffer that a
//! reader fills must be zeroed once more before `read` may write into it; or, once the
//! allocator keeps such blocks, they scatter over its per-thread arenas and the process
//! grows. A [`ChunkPool`] keeps a few buffers of its size: a [`Chunk`] is filled in place and
//! frozen into [`Bytes`]; when the last `Bytes` of it is dropped, on whichever thread, its
//! buffer goes back to the pool. Memory stays bounded by what is held at once (the pool
//! keeps at most `keep` idle buffers and frees the rest). Used by the pipeline's stages
//! (`pipeline::chunk`) and by S3 downloads, whose ranges land in them.
//!
//! What is freed still goes back to the kernel: blocks of a MiB and more at once
//! ([`return_large_frees`]), the rest of a worker's heap after each step ([`trim_heap`]).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Frees of blocks of a MiB and more go back to the kernel at once, for the whole process
/// (glibc; elsewhere this does nothing). Called first thing, before other threads exist.
///
/// glibc serves a block above its mmap threshold with a mapping of its own and unmaps it
/// when it is freed, but each such free raises the threshold to that block's size. One read
/// of a large manifest (a documents backup's index takes megabytes) therefore moved every
/// later large buffer of the process into the heap arenas, where freed memory stays
/// resident: a backup to S3 that ran after an earlier one, whose manifest it reads, peaked
/// a sixth higher than the same backup into an empty catalog. A fixed threshold stops that.
/// It sits above the pipeline's chunks (a quarter of a MiB, reused through `ChunkPool`),
/// which stay in the heap where taking them is cheap.
pub fn return_large_frees() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands the free pages inside the heap back to the kernel (glibc; elsewhere nothing). A
/// step's buffers under the mmap threshold are freed into the heap arenas of the threads that
/// used them, where they would stay resident until reused; a worker calls this after each
/// step, so that what it holds between steps is what it uses.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes each arena's lock; it is safe from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Buffers of `size` bytes that come back when the chunks made from them are dropped.
#[derive(Clone)]
pub(crate) struct ChunkPool(Arc<Shared>);

struct Shared {
    size: usize,
    keep: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

impl ChunkPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` of them idle.
    pub(crate) fn new(size: usize, keep: usize) -> Self {
        ChunkPool(Arc::new(Shared {
            size: size.max(1),
            keep,
            idle: Mutex::new(Vec::with_capacity(keep)),
        }))
    }

    /// An empty chunk: an idle buffer, or a new one (zeroed once, when it is made).
    pub(crate) fn take(&self) -> Chunk {
        let idle = self.0.idle.lock().ok().and_then(|mut idle| idle.pop());
        let data = idle.unwrap_or_else(|| vec![0; self.0.size + ALIGN - 1]);
        let start = data.as_ptr().align_offset(ALIGN);
        Chunk {
            end: start + self.0.size,
            filled: start,
            start,
            data,
            pool: self.clone(),
        }
    }

    fn give_back(&self, data: Vec<u8>) {
        if data.len() != self.0.size + ALIGN - 1 {
            return;
        }
        if let Ok(mut idle) = self.0.idle.lock()
            && idle.len() < self.0.keep
        {
            idle.push(data);
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.0.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }
}

/// A buffer of the pool's size being filled from the front; [`Chunk::freeze`] makes the
/// filled part [`Bytes`] without copying it.
pub(crate) struct Chunk {
    /// The allocation: `data[start..end]` is the chunk, `start` aligned to [`ALIGN`]; the
    /// bytes past `filled` are left from earlier use.
    data: Vec<u8>,
    start: usize,
    filled: usize,
    end: usize,
    pool: ChunkPool,
}

/// Chunks start on a page boundary. Writing a chunk to a file at a page-aligned offset
/// (every part of an upload starts at a multiple of the chunk size) then copies between
/// equally aligned addresses: from an allocation 16 bytes past a page, as the allocator
/// returns large blocks, the kernel's copy into the page cache took 5x the CPU time here.
const ALIGN: usize = 4096;

impl Chunk {
    pub(crate) fn is_empty(&self) -> bool {
        self.filled == self.start
    }

    pub(crate) fn is_full(&self) -> bool {
        self.filled == self.end
    }

    /// Bytes filled so far.
    pub(crate) fn len(&self) -> usize {
        self.filled - self.start
    }

    /// The room after the filled part, to read into (what it holds is unspecified);
    /// [`Chunk::advance`] then counts what was written.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        &mut self.data[self.filled..self.end]
    }

    /// Counts `n` bytes of [`Chunk::spare`] as filled.
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(n <= self.end - self.filled, "advanced past the chunk");
        self.filled += n;
    }

    /// Copies as much of `data` as fits; returns how much that was.
    pub(crate) fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.end - self.filled);
        self.data[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        n
    }

    /// The filled part as `Bytes`; the buffer returns to the pool when they are dropped.
    pub(crate) fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.data[self.start..self.filled]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_holds_what_was_filled_and_its_buffer_comes_back_after_the_last_clone() {
        let pool = ChunkPool::new(8, 2);
        let mut chunk = pool.take();
        assert_eq!(chunk.fill_from(b"abc"), 3);
        chunk.spare()[..2].copy_from_slice(b"de");
        chunk.advance(2);
        assert_eq!(chunk.fill_from(b"fghij"), 3, "only what fits is copied");
        assert!(chunk.is_full());
        let bytes = chunk.freeze();
        let clone = bytes.clone();
        assert_eq!(&bytes[..], b"abcdefgh");
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a clone still holds the buffer");
        drop(clone);
        assert_eq!(pool.idle(), 1);

        // A reused buffer starts empty, whatever it held before.
        let mut again = pool.take();
        assert!(again.is_empty());
        assert_eq!(pool.idle(), 0);
        again.fill_from(b"xy");
        assert_eq!(&again.freeze()[..], b"xy");
    }

    #[test]
    fn the_pool_keeps_no_more_idle_buffers_than_asked() {
        let pool = ChunkPool::new(4, 2);
        let chunks: Vec<_> = (0..5).map(|_| pool.take()).collect();
        drop(chunks);
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    #[should_panic(expected = "advanced past the chunk")]
    fn advancing_past_the_end_is_a_bug_not_a_read_of_stale_bytes() {
        let pool = ChunkPool::new(4, 1);
        let mut chunk = pool.take();
        chunk.advance(5);
    }
}
