//! The stored side of the backup direction: zstd, optional age encryption, and the SHA-256
//! and size of the bytes that are stored, handed on in chunks (blocking code).
//!
//! Without encryption zstd writes its output straight into the chunk being filled (zstd's
//! streaming API takes any output buffer), so compressed bytes are never copied on their
//! way to storage. With encryption, age needs a writer: zstd's output goes through a small
//! buffer into age's stream writer, which writes into the chunks.

use std::io::{self, Write};

use bytes::Bytes;
use tokio::sync::mpsc;
use zstd_sys::ZSTD_EndDirective;

use super::chunk::{ChunkPool, ChunkSender};
use super::zstd_context::{ZstdContext, ZstdSettings};
use super::{Codec, POOLED_CHUNKS, PipelineError, Tally};

/// Bytes per zstd worker job when compressing on several threads. zstd's default job is
/// 4× the window (8 MiB at level 3) per worker, buffered twice; 2 MiB jobs keep memory flat
/// and small at a negligible cost in ratio.
const ZSTD_JOB_SIZE: u32 = 2 << 20;

/// Compresses (and encrypts) raw bytes into stored chunks sent to the upload.
pub(super) struct Compressor {
    zstd: ZstdContext,
    out: Layer,
}

/// Where compressed bytes go.
enum Layer {
    Plain(StoredSink),
    /// age's writer, and a buffer for zstd's output on its way there.
    Age(age::stream::StreamWriter<StoredSink>, Vec<u8>),
}

impl Compressor {
    /// A compressor for one artifact (a zstd frame with its checksum) into `out`.
    pub(super) fn new(codec: &Codec, out: mpsc::Sender<Bytes>) -> Result<Self, PipelineError> {
        let sink = StoredSink {
            out: ChunkSender::new(
                Some(out),
                ChunkPool::new(codec.chunk_size, POOLED_CHUNKS),
                "the upload stopped",
            ),
            tally: Tally::default(),
        };
        let out = if codec.encrypts() {
            let recipients = codec.recipients.iter().map(|r| r as &dyn age::Recipient);
            let encryptor = age::Encryptor::with_recipients(recipients)
                .map_err(|err| PipelineError::Encode(io::Error::other(err.to_string())))?;
            let writer = encryptor.wrap_output(sink).map_err(PipelineError::Encode)?;
            Layer::Age(writer, vec![0; ZstdContext::out_size()])
        } else {
            Layer::Plain(sink)
        };
        let zstd = ZstdContext::new(&ZstdSettings {
            level: codec.zstd_level,
            workers: codec.zstd_workers,
            job_size: ZSTD_JOB_SIZE,
        })
        .map_err(zstd_error)?;
        Ok(Compressor { zstd, out })
    }

    /// Compresses all of `data`.
    pub(super) fn write_all(&mut self, data: &[u8]) -> Result<(), PipelineError> {
        let mut consumed = 0;
        while consumed < data.len() {
            self.step(data, &mut consumed, ZSTD_EndDirective::ZSTD_e_continue)?;
        }
        Ok(())
    }

    /// Ends the frame (and the encryption) and sends the last chunk; returns the SHA-256
    /// and size of the stored bytes.
    pub(super) fn finish(mut self) -> Result<(String, u64), PipelineError> {
        while self.step(&[], &mut 0, ZSTD_EndDirective::ZSTD_e_end)? > 0 {}
        let mut sink = match self.out {
            Layer::Plain(sink) => sink,
            Layer::Age(writer, _) => writer.finish().map_err(stored_error)?,
        };
        sink.out.send().map_err(stored_error)?;
        Ok(sink.tally.finish())
    }

    /// One call into zstd: takes input, writes output; returns what zstd has left to flush.
    fn step(
        &mut self,
        input: &[u8],
        consumed: &mut usize,
        directive: ZSTD_EndDirective,
    ) -> Result<usize, PipelineError> {
        match &mut self.out {
            Layer::Plain(sink) => {
                let chunk = sink.out.room().map_err(stored_error)?;
                let spare = chunk.spare();
                let (written, left) = self
                    .zstd
                    .compress(input, consumed, spare, directive)
                    .map_err(zstd_error)?;
                sink.tally.update(&spare[..written]);
                chunk.advance(written);
                Ok(left)
            }
            Layer::Age(writer, buffer) => {
                let (written, left) = self
                    .zstd
                    .compress(input, consumed, buffer, directive)
                    .map_err(zstd_error)?;
                writer.write_all(&buffer[..written]).map_err(stored_error)?;
                Ok(left)
            }
        }
    }
}

/// A failed write of stored bytes: the upload stopped taking them, or age failed.
fn stored_error(err: io::Error) -> PipelineError {
    if err.kind() == io::ErrorKind::BrokenPipe {
        PipelineError::UploadStopped
    } else {
        PipelineError::Encode(err)
    }
}

fn zstd_error(reason: String) -> PipelineError {
    PipelineError::Encode(io::Error::other(format!("zstd: {reason}")))
}

/// The last stage: hashes stored bytes and hands them on in chunks.
struct StoredSink {
    out: ChunkSender,
    tally: Tally,
}

/// age writes its ciphertext here.
impl Write for StoredSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tally.update(data);
        self.out.push(data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use sha2::Digest;

    use super::*;

    use crate::pipeline::tests::codec_with as codec;

    fn compress(codec: &Codec, input: &[u8]) -> (Vec<Bytes>, (String, u64)) {
        let (tx, mut rx) = mpsc::channel(100_000);
        let mut compressor = Compressor::new(codec, tx).unwrap();
        for piece in input.chunks(10_000) {
            compressor.write_all(piece).unwrap();
        }
        let tally = compressor.finish().unwrap();
        let mut chunks = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            chunks.push(chunk);
        }
        (chunks, tally)
    }

    fn input() -> Vec<u8> {
        // Compressible text, then bytes zstd cannot shrink.
        let mut input: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        input.extend((0..300_000).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        }));
        input
    }

    #[test]
    fn stored_chunks_are_one_zstd_frame_of_the_input_and_the_tally_is_theirs() {
        let input = input();
        for workers in [0, 1] {
            let (chunks, (sha256, size)) = compress(&codec(workers, vec![]), &input);
            assert!(chunks.len() > 100, "{} chunks", chunks.len());
            assert!(chunks[..chunks.len() - 1].iter().all(|c| c.len() == 1024));
            let stored: Vec<u8> = chunks.concat();
            assert_eq!(size, stored.len() as u64);
            assert_eq!(sha256, hex::encode(sha2::Sha256::digest(&stored)));
            assert!(zstd::decode_all(stored.as_slice()).unwrap() == input);
        }
    }

    #[test]
    fn encrypted_chunks_decrypt_to_the_zstd_frame() {
        let identity = age::x25519::Identity::generate();
        let codec = codec(1, vec![identity.to_public().to_string()]);
        let input = input();
        let (chunks, (sha256, size)) = compress(&codec, &input);
        let stored: Vec<u8> = chunks.concat();
        assert_eq!(size, stored.len() as u64);
        assert_eq!(sha256, hex::encode(sha2::Sha256::digest(&stored)));
        let decryptor = age::Decryptor::new(stored.as_slice()).unwrap();
        let mut frame = Vec::new();
        decryptor
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .unwrap()
            .read_to_end(&mut frame)
            .unwrap();
        assert!(zstd::decode_all(frame.as_slice()).unwrap() == input);
    }
}
