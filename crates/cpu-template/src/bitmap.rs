//! The tri-state bitmap of a register modifier: `"0bxx01..."`, one character per bit, the
//! most significant first. `0` and `1` force the bit, `x` leaves it as it is, `_` separates
//! groups and stands for no bit.

/// Which bits of a register a modifier forces (`filter`) and to what (`value`).
///
/// Applied to a register value `r`, the result is `(r & !filter) | value`; `value` never
/// has a bit outside `filter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bitmap {
    /// The bits the modifier forces.
    pub filter: u64,
    /// Their values.
    pub value: u64,
}

impl Bitmap {
    /// A bitmap forcing the bits of `filter` to those of `value`.
    pub const fn new(filter: u64, value: u64) -> Self {
        Self {
            filter,
            value: value & filter,
        }
    }

    /// Reads `"0b01x_x10"` (the `0b` prefix is optional) for a register of `width` bits.
    /// Bits the string does not reach, above its first character, are left unchanged.
    ///
    /// # Errors
    ///
    /// The reason, for a character other than `0`, `1`, `x` and `_`, or more than `width`
    /// bits.
    pub fn parse(text: &str, width: u32) -> Result<Self, String> {
        let digits = text.strip_prefix("0b").unwrap_or(text);
        let (mut filter, mut value) = (0u64, 0u64);
        let mut bit = 0u32;
        for c in digits.chars().rev() {
            if c == '_' {
                continue;
            }
            if bit == width {
                return Err(format!(
                    "bitmap \"{text}\" has more than {width} bits for a {width}-bit register"
                ));
            }
            match c {
                'x' => {}
                '0' => filter |= 1 << bit,
                '1' => {
                    filter |= 1 << bit;
                    value |= 1 << bit;
                }
                other => {
                    return Err(format!(
                    "bitmap \"{text}\" has the character '{other}': only 0, 1, x and _ are allowed"
                ))
                }
            }
            bit += 1;
        }
        Ok(Self { filter, value })
    }

    /// The string [`Bitmap::parse`] reads back: `0b` and `width` characters.
    pub fn to_bit_string(&self, width: u32) -> String {
        let mut s = String::with_capacity(width as usize + 2);
        s.push_str("0b");
        for bit in (0..width).rev() {
            let mask = 1u64 << bit;
            s.push(match (self.filter & mask != 0, self.value & mask != 0) {
                (false, _) => 'x',
                (true, false) => '0',
                (true, true) => '1',
            });
        }
        s
    }

    /// `register` with the forced bits replaced.
    pub const fn apply(&self, register: u64) -> u64 {
        (register & !self.filter) | self.value
    }

    /// [`Bitmap::apply`] for a 32-bit register (a bitmap read for 32 bits forces none above).
    pub const fn apply32(&self, register: u32) -> u32 {
        // Truncation is the point: the upper half of a 32-bit bitmap is empty.
        self.apply(register as u64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tri_state_strings() {
        let b = Bitmap::parse("0b1x0_1", 32).unwrap();
        assert_eq!(b, Bitmap::new(0b1011, 0b1001));
        // The prefix is optional; an empty bitmap changes nothing.
        assert_eq!(Bitmap::parse("10", 32).unwrap(), Bitmap::new(0b11, 0b10));
        assert_eq!(Bitmap::parse("0b", 32).unwrap(), Bitmap::default());
        let full = format!("0b{}", "1".repeat(64));
        assert_eq!(Bitmap::parse(&full, 64).unwrap(), Bitmap::new(!0, !0));
    }

    #[test]
    fn refuses_bad_characters_and_too_many_bits() {
        let e = Bitmap::parse("0b10z1", 32).unwrap_err();
        assert!(e.contains("'z'"), "{e}");
        let e = Bitmap::parse(&"1".repeat(33), 32).unwrap_err();
        assert!(e.contains("more than 32 bits"), "{e}");
        // Separators do not count as bits.
        Bitmap::parse(&format!("0b{}_", "x".repeat(32)), 32).unwrap();
        // A second prefix is not a bit.
        assert!(Bitmap::parse("0b0b1", 32).is_err());
    }

    #[test]
    fn applies_and_prints_back() {
        let b = Bitmap::parse("0b0xx1", 32).unwrap();
        assert_eq!(b.apply32(0b1110), 0b0111);
        assert_eq!(b.apply32(0xffff_0000), 0xffff_0001);
        let text = b.to_bit_string(32);
        assert_eq!(text.len(), 34);
        assert!(text.ends_with("0xx1"));
        assert_eq!(Bitmap::parse(&text, 32).unwrap(), b);
        let wide = Bitmap::new(1 << 63, 0);
        assert_eq!(wide.apply(u64::MAX), u64::MAX >> 1);
        assert_eq!(Bitmap::parse(&wide.to_bit_string(64), 64).unwrap(), wide);
    }
}
