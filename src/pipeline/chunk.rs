//! Chunks sent between pipeline stages.
//!
//! Every artifact moves through the pipeline in chunks of one size, taken from a
//! [`ChunkPool`] (reused buffers, see `crate::buffers`). A [`ChunkSender`] is the blocking
//! stage's end of a channel: it fills chunks and sends each one when full.

use std::io;

use bytes::Bytes;
use tokio::sync::mpsc;

pub(crate) use crate::buffers::{Chunk, ChunkPool};

/// Fills chunks of a pool and sends each one down a channel when it is full (blocking).
pub(crate) struct ChunkSender {
    tx: Option<mpsc::Sender<Bytes>>,
    chunk: Chunk,
    pool: ChunkPool,
    /// Why a send fails: the receiving stage stopped.
    stopped: &'static str,
}

impl ChunkSender {
    /// A sender into `tx` (`None`: every send fails with `stopped`).
    pub(crate) fn new(
        tx: Option<mpsc::Sender<Bytes>>,
        pool: ChunkPool,
        stopped: &'static str,
    ) -> Self {
        ChunkSender {
            tx,
            chunk: pool.take(),
            pool,
            stopped,
        }
    }

    /// Copies `data` into chunks, sending every chunk that fills up.
    pub(crate) fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.room()?.fill_from(data);
            data = &data[n..];
        }
        Ok(())
    }

    /// The chunk being filled, with room in it (a full one is sent first).
    pub(crate) fn room(&mut self) -> io::Result<&mut Chunk> {
        if self.chunk.is_full() {
            self.send()?;
        }
        Ok(&mut self.chunk)
    }

    /// Sends the chunk being filled, unless it is empty.
    pub(crate) fn send(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, self.pool.take()).freeze();
        let sent = match &self.tx {
            Some(tx) => tx.blocking_send(chunk).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, self.stopped))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_sends_full_chunks_then_the_rest_and_fails_once_the_receiver_is_gone() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut sender = ChunkSender::new(Some(tx), ChunkPool::new(4, 2), "stopped");
        sender.push(b"abcdefghij").unwrap();
        sender.send().unwrap();
        sender.send().unwrap(); // nothing left: no empty chunk is sent
        let mut received = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            received.push(chunk);
        }
        assert_eq!(received, [&b"abcd"[..], b"efgh", b"ij"]);
        drop(rx);
        sender.push(b"k").unwrap();
        let err = sender.send().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(err.to_string(), "stopped");
    }
}
