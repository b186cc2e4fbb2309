//! The SHA-256 of each file's content in a tar stream, computed as the stream passes the
//! pipeline's hashing thread: the inspector finds the files by reading the tar headers, and
//! hashes each file's content into its own digest in the same pass as the stream's digest
//! (see `pipeline::sha256::update_both`).

use crate::pipeline::Inspect;
use crate::pipeline::sha256::{Sha256, update_both};

/// tar's record size: headers are one record, content is padded to whole records.
const RECORD: u64 = 512;

/// See the module documentation; [`FileDigests::finish`] gives the digests of the regular
/// files, in the order they are in the stream.
#[derive(Default)]
pub struct FileDigests {
    state: State,
    /// The header being gathered.
    header: Vec<u8>,
    digests: Vec<String>,
    failed: Option<String>,
}

#[derive(Default)]
enum State {
    /// Between entries: the next bytes are a header.
    #[default]
    Header,
    /// Inside a regular file's content; `padding` zeros follow it.
    Content {
        left: u64,
        padding: u64,
        digest: Box<Sha256>,
    },
    /// Content of another entry (a GNU long name), or the padding after content.
    Skip { left: u64 },
    /// After the end-of-archive record.
    End,
}

impl Inspect for FileDigests {
    fn inspect(&mut self, raw: &[u8]) {
        self.hash_and_inspect(raw, &mut Sha256::new());
    }

    fn hash_and_inspect(&mut self, mut raw: &[u8], stream: &mut Sha256) {
        while !raw.is_empty() {
            match &mut self.state {
                State::Header => {
                    let n = raw.len().min(RECORD as usize - self.header.len());
                    self.header.extend_from_slice(&raw[..n]);
                    stream.update(&raw[..n]);
                    raw = &raw[n..];
                    if self.header.len() == RECORD as usize {
                        self.state = self.entry();
                        self.header.clear();
                    }
                }
                State::Content { left, digest, .. } => {
                    let n = raw.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    update_both(stream, digest, &raw[..n]);
                    *left -= n as u64;
                    raw = &raw[n..];
                    if *left == 0 {
                        self.close_file();
                    }
                }
                State::Skip { left } => {
                    let n = raw.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    stream.update(&raw[..n]);
                    *left -= n as u64;
                    raw = &raw[n..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::End => {
                    stream.update(raw);
                    return;
                }
            }
        }
    }
}

impl FileDigests {
    /// The state after the header just gathered.
    fn entry(&mut self) -> State {
        if self.header.iter().all(|&b| b == 0) {
            return State::End;
        }
        let header = tar::Header::from_byte_slice(&self.header);
        let size = match header.entry_size() {
            Ok(size) => size,
            Err(err) => {
                self.failed.get_or_insert(format!("a tar header: {err}"));
                return State::End;
            }
        };
        if header.entry_type().is_file() {
            let digest = Box::new(Sha256::new());
            if size == 0 {
                self.digests.push(digest.finish_hex());
                return State::Header;
            }
            return State::Content {
                left: size,
                padding: padded(size) - size,
                digest,
            };
        }
        match padded(size) {
            0 => State::Header,
            left => State::Skip { left },
        }
    }

    /// A file's content has passed: its digest is done, its padding follows.
    fn close_file(&mut self) {
        if let State::Content {
            padding, digest, ..
        } = std::mem::take(&mut self.state)
        {
            self.digests.push(digest.finish_hex());
            self.state = match padding {
                0 => State::Header,
                left => State::Skip { left },
            };
        }
    }

    /// The digests of the regular files, in stream order.
    pub fn finish(self) -> Result<Vec<String>, String> {
        match self.failed {
            Some(reason) => Err(reason),
            None => Ok(self.digests),
        }
    }
}

/// `size` rounded up to whole records.
fn padded(size: u64) -> u64 {
    size.div_ceil(RECORD) * RECORD
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn each_file_is_hashed_and_the_stream_digest_is_unchanged() {
        let mut builder = tar::Builder::new(Vec::new());
        let files: Vec<(String, Vec<u8>)> = vec![
            ("empty".into(), Vec::new()),
            (
                format!("long/{}", "n".repeat(200)),
                (0..70_000u32).map(|i| i as u8).collect(),
            ),
            ("exact".into(), vec![7; 1024]),
            ("odd".into(), b"odd".to_vec()),
        ];
        for (path, content) in &files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, path, content.as_slice())
                .unwrap();
            let mut dir = tar::Header::new_gnu();
            dir.set_entry_type(tar::EntryType::Directory);
            dir.set_size(0);
            builder
                .append_data(&mut dir, format!("{path}.d"), std::io::empty())
                .unwrap();
        }
        let tar = builder.into_inner().unwrap();
        for piece in [1, 100, 512, 4096, tar.len()] {
            let mut inspector = FileDigests::default();
            let mut stream = Sha256::new();
            for chunk in tar.chunks(piece) {
                inspector.hash_and_inspect(chunk, &mut stream);
            }
            assert_eq!(stream.finish_hex(), hex::encode(sha2::Sha256::digest(&tar)));
            let expected: Vec<String> = files
                .iter()
                .map(|(_, content)| hex::encode(sha2::Sha256::digest(content)))
                .collect();
            assert_eq!(inspector.finish().unwrap(), expected, "pieces of {piece}");
        }
    }
}
