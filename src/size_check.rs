//! The size check of a finished backup: a full backup whose raw size fell below
//! `size_check.drop_ratio` (or rose above `size_check.jump_ratio`) of the previous full
//! backup of the same target is still kept, but says so — an empty dump that "succeeded" is
//! the failure a backup tool must not let pass quietly.

/// What the check can say of a backup.
pub const SIZE_DROP: &str = "size_drop";
pub const SIZE_JUMP: &str = "size_jump";

/// The warning for a backup of `raw` bytes after one of `previous` bytes, if any.
pub fn size_warning(
    previous: u64,
    raw: u64,
    drop_ratio: f64,
    jump_ratio: f64,
) -> Option<&'static str> {
    if previous == 0 {
        return None;
    }
    let ratio = raw as f64 / previous as f64;
    if ratio < drop_ratio {
        Some(SIZE_DROP)
    } else if ratio > jump_ratio {
        Some(SIZE_JUMP)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_and_jumps_beyond_the_ratios_are_flagged() {
        assert_eq!(size_warning(1000, 400, 0.5, 3.0), Some(SIZE_DROP));
        assert_eq!(size_warning(1000, 0, 0.5, 3.0), Some(SIZE_DROP));
        assert_eq!(size_warning(1000, 500, 0.5, 3.0), None);
        assert_eq!(size_warning(1000, 3000, 0.5, 3.0), None);
        assert_eq!(size_warning(1000, 3001, 0.5, 3.0), Some(SIZE_JUMP));
        // Nothing to compare with: a first backup, or an empty source before.
        assert_eq!(size_warning(0, 5000, 0.5, 3.0), None);
    }
}
