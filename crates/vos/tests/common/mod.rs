//! Helpers shared by the VOS integration tests.

/// `len` bytes of xorshift64 noise from `state` (non-zero): distinctive, incompressible values.
pub fn xorshift_bytes(mut state: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
