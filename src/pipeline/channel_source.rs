//! A pipeline source fed by an async producer (an HTTP body, a SCAN loop): the producer sends
//! chunks into a channel and the pipeline's thread reads them as a blocking [`Read`].
//!
//! The producer ends the stream by dropping its sender; a producer that fails returns its
//! own error and the target drops the uncommitted artifact.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::CHANNEL_DEPTH;

/// The reading end: see the module documentation.
pub struct ChannelSource {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelSource {
    /// A source and the sender its producer writes into.
    pub fn new() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        (
            tx,
            ChannelSource {
                rx,
                current: Bytes::new(),
            },
        )
    }
}

impl Read for ChannelSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(bytes) => self.current = bytes,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_read_in_order_and_a_dropped_sender_ends_the_stream() {
        let (tx, mut source) = ChannelSource::new();
        let producer = std::thread::spawn(move || {
            for piece in [&b"abc"[..], b"", b"defgh"] {
                tx.blocking_send(Bytes::copy_from_slice(piece)).unwrap();
            }
        });
        let mut all = Vec::new();
        source.read_to_end(&mut all).unwrap();
        producer.join().unwrap();
        assert_eq!(all, b"abcdefgh");
    }
}
