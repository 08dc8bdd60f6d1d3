//! temporary: time one pathological pattern
use agentgate_masking::{MaskReport, Masker, MaskingConfig};
fn main() {
    let m = Masker::new(&MaskingConfig::recommended(), None).expect("c");
    let unit = std::env::args().nth(1).unwrap_or("AKIA".into());
    for n in [1usize << 12, 1 << 14, 1 << 16] {
        let input: Vec<u8> = unit.bytes().cycle().take(n).collect();
        let t = std::time::Instant::now();
        let mut r = MaskReport::new();
        let out = m.mask_bytes(&input, &mut r);
        println!("{n}: {:?} {}", t.elapsed(), out.len());
    }
}
