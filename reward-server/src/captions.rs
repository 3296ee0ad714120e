//! Captions: normalised text and a stable 64-bit hash (FNV-1a), so the same
//! message is one label however it was spaced or capitalised.

use sluice_core::limits::MAX_CAPTION_BYTES;

/// Lower-cases, trims and collapses runs of whitespace to one space.
pub fn normalise(text: &str) -> String {
    text.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// FNV-1a over the normalised bytes.
pub fn hash(normalised: &str) -> u64 {
    sluice_core::fnv1a(normalised.as_bytes())
}

/// A checked caption: its normalised text and hash, or why it is refused.
pub fn check(text: &str) -> Result<(String, u64), String> {
    if text.contains('\0') {
        return Err("caption contains a NUL byte".into());
    }
    let n = normalise(text);
    if n.is_empty() {
        return Err("caption is empty".into());
    }
    if n.len() > MAX_CAPTION_BYTES {
        return Err(format!("caption is {} bytes, over the limit of {MAX_CAPTION_BYTES}", n.len()));
    }
    let h = hash(&n);
    Ok((n, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_and_case_do_not_change_the_hash() {
        let (a, ha) = check("  You see a  RED key.\n").unwrap();
        let (b, hb) = check("you see a red key.").unwrap();
        assert_eq!((a.as_str(), ha), (b.as_str(), hb));
        assert_ne!(ha, check("you see a blue key.").unwrap().1);
        assert!(check("   ").is_err() && check("a\0b").is_err() && check(&"x".repeat(5000)).is_err());
    }
}
