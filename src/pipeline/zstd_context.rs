//! The zstd compression context of the backup direction, owned through `zstd-sys` because
//! one of its settings has no name in `zstd-safe`: zstd 1.5.7's pre-block splitter.
//!
//! Two settings differ from zstd's defaults, both for CPU next to production:
//! - The pre-block splitter is off. It looks for a place inside every 128 KiB block where
//!   the content changes and cuts the block there; on mixed content (documents that are half
//!   random, half text) it costs about a third more compression CPU for about 1% smaller
//!   output. zstd 1.5.6 and earlier (the `zstd` command of most distributions) never split
//!   blocks this way.
//! - With workers, a job does not reload the tail of the previous job as history (zstd's
//!   default reloads an eighth of the window into the match tables of every job): less CPU
//!   per job for output of the same size.
//!
//! The output is an ordinary zstd frame either way: `zstd -d` reads it.

use std::ptr::NonNull;

use zstd_sys::{ZSTD_EndDirective, ZSTD_cParameter};

/// `ZSTD_c_blockSplitterLevel` (zstd.h names it only for static linking). Experimental
/// parameters are renumbered between releases: this number means the splitter in zstd 1.5.7,
/// which `zstd-sys` is pinned to bundle; with any other zstd the setting is left alone.
const BLOCK_SPLITTER_LEVEL: ZSTD_cParameter = ZSTD_cParameter::ZSTD_c_experimentalParam20;
/// The zstd release whose experimental parameter 20 is the block splitter: 1.5.7.
const SPLITTER_ZSTD_VERSION: u32 = 1_05_07;
/// The splitter level that means "never split".
const NO_SPLITTING: i32 = 1;

/// The overlap log that means "a worker's job starts without the previous job's tail".
const NO_OVERLAP: i32 = 1;

/// What a context is set up with.
pub(super) struct ZstdSettings {
    pub level: i32,
    /// Worker threads; 0 compresses on the calling thread.
    pub workers: u32,
    /// Bytes per worker job (used with workers only).
    pub job_size: u32,
}

/// One zstd frame being written, with its checksum.
pub(super) struct ZstdContext(NonNull<zstd_sys::ZSTD_CCtx>);

// SAFETY: a context has no affinity to the thread that made it; `&mut self` on every call
// keeps it to one thread at a time, which is all zstd asks.
unsafe impl Send for ZstdContext {}

impl ZstdContext {
    pub(super) fn new(settings: &ZstdSettings) -> Result<Self, String> {
        // SAFETY: returns a new context, owned by the result (freed on drop), or null.
        let context = NonNull::new(unsafe { zstd_sys::ZSTD_createCCtx() })
            .map(ZstdContext)
            .ok_or("zstd could not allocate a compression context")?;
        let workers = i32::try_from(settings.workers).map_err(|_| "too many zstd workers")?;
        // zstd.h's names, for error messages (the splitter's is not in the bindings' enum).
        let mut parameters = vec![
            (
                "compressionLevel",
                ZSTD_cParameter::ZSTD_c_compressionLevel,
                settings.level,
            ),
            ("checksumFlag", ZSTD_cParameter::ZSTD_c_checksumFlag, 1),
        ];
        if linked_version() == SPLITTER_ZSTD_VERSION {
            parameters.push(("blockSplitterLevel", BLOCK_SPLITTER_LEVEL, NO_SPLITTING));
        }
        if workers > 0 {
            let job_size = i32::try_from(settings.job_size).map_err(|_| "zstd job too large")?;
            parameters.extend([
                ("nbWorkers", ZSTD_cParameter::ZSTD_c_nbWorkers, workers),
                ("jobSize", ZSTD_cParameter::ZSTD_c_jobSize, job_size),
                ("overlapLog", ZSTD_cParameter::ZSTD_c_overlapLog, NO_OVERLAP),
            ]);
        }
        for (name, parameter, value) in parameters {
            // SAFETY: the context is valid; zstd checks the parameter and its value.
            let code =
                unsafe { zstd_sys::ZSTD_CCtx_setParameter(context.0.as_ptr(), parameter, value) };
            check(code).map_err(|error| format!("zstd parameter {name} = {value}: {error}"))?;
        }
        Ok(context)
    }

    /// The output buffer size zstd recommends: room for at least one whole compressed block.
    pub(super) fn out_size() -> usize {
        // SAFETY: returns a constant.
        unsafe { zstd_sys::ZSTD_CStreamOutSize() }
    }

    /// One `ZSTD_compressStream2` call: takes input from `input[*consumed..]` (advancing
    /// `consumed`), writes output into `output`. Returns the bytes written and what zstd still
    /// has to flush (0 once `ZSTD_e_end` has written the whole frame).
    pub(super) fn compress(
        &mut self,
        input: &[u8],
        consumed: &mut usize,
        output: &mut [u8],
        directive: ZSTD_EndDirective,
    ) -> Result<(usize, usize), String> {
        assert!(*consumed <= input.len());
        let mut inb = zstd_sys::ZSTD_inBuffer {
            src: input.as_ptr().cast(),
            size: input.len(),
            pos: *consumed,
        };
        let mut outb = zstd_sys::ZSTD_outBuffer {
            dst: output.as_mut_ptr().cast(),
            size: output.len(),
            pos: 0,
        };
        // SAFETY: both buffers describe live slices with their true lengths and positions
        // within them; zstd reads and writes only inside them and keeps no pointer to either
        // after the call (without ZSTD_c_stableInBuffer it copies what it must keep).
        let left = unsafe {
            zstd_sys::ZSTD_compressStream2(self.0.as_ptr(), &mut outb, &mut inb, directive)
        };
        let left = check(left)?;
        *consumed = inb.pos;
        Ok((outb.pos, left))
    }
}

impl Drop for ZstdContext {
    fn drop(&mut self) {
        // SAFETY: the context is ours and used no more; zstd stops its workers first.
        unsafe { zstd_sys::ZSTD_freeCCtx(self.0.as_ptr()) };
    }
}

/// The version of the zstd library linked in, as `major * 10000 + minor * 100 + patch`.
fn linked_version() -> u32 {
    // SAFETY: returns a constant.
    unsafe { zstd_sys::ZSTD_versionNumber() }
}

/// zstd's result code, or the name of its error.
fn check(code: usize) -> Result<usize, String> {
    // SAFETY: both functions only inspect the number.
    if unsafe { zstd_sys::ZSTD_isError(code) } != 0 {
        let name = unsafe { std::ffi::CStr::from_ptr(zstd_sys::ZSTD_getErrorName(code)) };
        Err(name.to_string_lossy().into_owned())
    } else {
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(workers: u32) -> ZstdSettings {
        ZstdSettings {
            level: 3,
            workers,
            job_size: 1 << 20,
        }
    }

    // zstd.h declares it only for static linking; the library always has it.
    unsafe extern "C" {
        fn ZSTD_CCtx_getParameter(
            cctx: *const zstd_sys::ZSTD_CCtx,
            parameter: ZSTD_cParameter,
            value: *mut std::ffi::c_int,
        ) -> usize;
    }

    fn parameter(context: &ZstdContext, parameter: ZSTD_cParameter) -> i32 {
        let mut value = 0;
        // SAFETY: a valid context and a place for the value.
        let code = unsafe { ZSTD_CCtx_getParameter(context.0.as_ptr(), parameter, &mut value) };
        check(code).unwrap();
        value
    }

    #[test]
    fn the_linked_zstd_is_the_release_whose_parameter_20_is_the_block_splitter() {
        assert_eq!(linked_version(), SPLITTER_ZSTD_VERSION);
    }

    #[test]
    fn the_context_has_the_settings_without_splitting_or_overlap() {
        let context = ZstdContext::new(&settings(1)).unwrap();
        assert_eq!(parameter(&context, BLOCK_SPLITTER_LEVEL), NO_SPLITTING);
        assert_eq!(
            parameter(&context, ZSTD_cParameter::ZSTD_c_compressionLevel),
            3
        );
        assert_eq!(parameter(&context, ZSTD_cParameter::ZSTD_c_checksumFlag), 1);
        assert_eq!(parameter(&context, ZSTD_cParameter::ZSTD_c_nbWorkers), 1);
        assert_eq!(
            parameter(&context, ZSTD_cParameter::ZSTD_c_jobSize),
            1 << 20
        );
    }

    #[test]
    fn a_job_size_zstd_cannot_take_is_refused() {
        let settings = ZstdSettings {
            job_size: u32::MAX,
            ..settings(1)
        };
        assert_eq!(
            ZstdContext::new(&settings).err().unwrap(),
            "zstd job too large"
        );
    }

    #[test]
    fn an_error_code_becomes_zstd_s_name_for_it() {
        // zstd returns errors as (size_t)-code; 42 is ZSTD_error_parameter_outOfBound.
        assert_eq!(
            check(0usize.wrapping_sub(42)).unwrap_err(),
            "Parameter is out of bound"
        );
        assert_eq!(check(7), Ok(7));
    }

    #[test]
    fn output_space_is_filled_and_the_frame_ends_when_flushed() {
        let input: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut context = ZstdContext::new(&settings(0)).unwrap();
        let mut frame = Vec::new();
        let mut output = [0u8; 100];
        let mut consumed = 0;
        while consumed < input.len() {
            let (written, _) = context
                .compress(
                    &input,
                    &mut consumed,
                    &mut output,
                    ZSTD_EndDirective::ZSTD_e_continue,
                )
                .unwrap();
            frame.extend_from_slice(&output[..written]);
        }
        loop {
            let (written, left) = context
                .compress(&[], &mut 0, &mut output, ZSTD_EndDirective::ZSTD_e_end)
                .unwrap();
            frame.extend_from_slice(&output[..written]);
            if left == 0 {
                break;
            }
        }
        assert!(frame.len() < input.len() / 2);
        assert_eq!(zstd::decode_all(frame.as_slice()).unwrap(), input);
    }
}
