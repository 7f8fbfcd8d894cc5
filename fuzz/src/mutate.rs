//! The quick driver's mutator: small random edits of seed inputs, libFuzzer's kinds without its
//! coverage feedback. A fixed seed replays a run exactly.

/// xorshift64*: fast, and the same sequence for the same seed on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Tokens worth splicing into text formats (JSON, TOML) and tar headers: delimiters, escapes,
/// and numbers at the edges of the integer types.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b"[[",
    b"=",
    b",",
    b":",
    b"\n",
    b"\r\n",
    b"\"\"\"",
    b"'''",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e999",
    b"nan",
    b"inf",
    b"4294967296",
    b"9007199254740993",
    b"18446744073709551615",
    b"18446744073709551616",
    b"77777777777",
    b"..",
    b"/",
    b"\xc3\xa9",
    b"\x1b[2J",
    b"\x00",
    b"\xff",
];

/// `input` with one to four random edits, `other` (another seed) available for splicing.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        edit(rng, &mut v, other);
    }
    v.truncate(max_len);
    v
}

fn edit(rng: &mut Rng, v: &mut Vec<u8>, other: &[u8]) {
    let pos = |rng: &mut Rng, v: &Vec<u8>| rng.below(v.len() + 1);
    match rng.below(8) {
        0 if !v.is_empty() => {
            let i = rng.below(v.len());
            v[i] ^= 1 << rng.below(8);
        }
        1 if !v.is_empty() => {
            let i = rng.below(v.len());
            v[i] = rng.next_u64() as u8;
        }
        2 => {
            let i = pos(rng, v);
            v.insert(i, rng.next_u64() as u8);
        }
        3 if !v.is_empty() => {
            let i = rng.below(v.len());
            let n = 1 + rng.below((v.len() - i).min(16));
            v.drain(i..i + n);
        }
        4 if !v.is_empty() => {
            // Copy a chunk of the input to another place (repeats fields, grows lists).
            let i = rng.below(v.len());
            let n = 1 + rng.below((v.len() - i).min(64));
            let chunk = v[i..i + n].to_vec();
            let at = pos(rng, v);
            v.splice(at..at, chunk);
        }
        5 if !other.is_empty() => {
            // Splice: this input's head, the other's tail.
            let cut = pos(rng, v);
            let from = rng.below(other.len());
            v.truncate(cut);
            v.extend_from_slice(&other[from..]);
        }
        6 if !v.is_empty() => {
            // Overwrite bytes with a token (a tar size field, a JSON number, a delimiter).
            let i = rng.below(v.len());
            let tok = TOKENS[rng.below(TOKENS.len())];
            let end = (i + tok.len()).min(v.len());
            v.splice(i..end, tok.iter().copied());
        }
        _ => {
            let tok = TOKENS[rng.below(TOKENS.len())];
            let at = pos(rng, v);
            v.splice(at..at, tok.iter().copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutations() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| mutate(&mut rng, b"{\"a\": 1}", b"[2, 3]", 64))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().all(|m| m.len() <= 64));
        assert!(run(7).iter().any(|m| m != b"{\"a\": 1}"));
    }
}
