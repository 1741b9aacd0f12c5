//! Checksums and small validators the detectors confirm candidates with.

use base64::Engine;

/// Luhn (mod 10) over ASCII digits.
pub(crate) fn luhn(digits: &[u8]) -> bool {
    if digits.is_empty() {
        return false;
    }
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn prefix_num(d: &[u8], n: usize) -> u32 {
    d.iter()
        .take(n)
        .fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0'))
}

/// Issuer prefix (IIN) and length of the major card networks.
pub(crate) fn card_brand_ok(d: &[u8]) -> bool {
    let len = d.len();
    if !(13..=19).contains(&len) {
        return false;
    }
    let p2 = prefix_num(d, 2);
    let p3 = prefix_num(d, 3);
    let p4 = prefix_num(d, 4);
    match d[0] {
        // Visa
        b'4' => matches!(len, 13 | 16 | 19),
        // Mastercard 51-55, Maestro 50 / 56-58
        b'5' => ((51..=55).contains(&p2) && len == 16) || p2 == 50 || (56..=58).contains(&p2),
        // Mastercard 2-series
        b'2' => (2221..=2720).contains(&p4) && len == 16,
        // Amex 34/37, Diners 300-305/36/38/39, JCB 3528-3589
        b'3' => {
            ((p2 == 34 || p2 == 37) && len == 15)
                || (((300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39)
                    && (14..=16).contains(&len))
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&len))
        }
        // Discover 6011/644-649/65, UnionPay 62, Maestro 6x
        b'6' => (16..=19).contains(&len),
        _ => false,
    }
}

/// IBAN length by country (ISO 13616 registry).
pub(crate) fn iban_len(cc: [u8; 2]) -> Option<usize> {
    const TABLE: &[(&[u8; 2], usize)] = &[
        (b"AD", 24),
        (b"AE", 23),
        (b"AL", 28),
        (b"AT", 20),
        (b"AZ", 28),
        (b"BA", 20),
        (b"BE", 16),
        (b"BG", 22),
        (b"BH", 22),
        (b"BR", 29),
        (b"BY", 28),
        (b"CH", 21),
        (b"CR", 22),
        (b"CY", 28),
        (b"CZ", 24),
        (b"DE", 22),
        (b"DK", 18),
        (b"DO", 28),
        (b"EE", 20),
        (b"EG", 29),
        (b"ES", 24),
        (b"FI", 18),
        (b"FO", 18),
        (b"FR", 27),
        (b"GB", 22),
        (b"GE", 22),
        (b"GI", 23),
        (b"GL", 18),
        (b"GR", 27),
        (b"GT", 28),
        (b"HR", 21),
        (b"HU", 28),
        (b"IE", 22),
        (b"IL", 23),
        (b"IQ", 23),
        (b"IS", 26),
        (b"IT", 27),
        (b"JO", 30),
        (b"KW", 30),
        (b"KZ", 20),
        (b"LB", 28),
        (b"LC", 32),
        (b"LI", 21),
        (b"LT", 20),
        (b"LU", 20),
        (b"LV", 21),
        (b"MC", 27),
        (b"MD", 24),
        (b"ME", 22),
        (b"MK", 19),
        (b"MR", 27),
        (b"MT", 31),
        (b"MU", 30),
        (b"NL", 18),
        (b"NO", 15),
        (b"PK", 24),
        (b"PL", 28),
        (b"PS", 29),
        (b"PT", 25),
        (b"QA", 29),
        (b"RO", 24),
        (b"RS", 22),
        (b"SA", 24),
        (b"SC", 31),
        (b"SE", 24),
        (b"SI", 19),
        (b"SK", 24),
        (b"SM", 27),
        (b"ST", 25),
        (b"SV", 28),
        (b"TL", 23),
        (b"TN", 24),
        (b"TR", 26),
        (b"UA", 29),
        (b"VA", 22),
        (b"VG", 24),
        (b"XK", 20),
    ];
    TABLE.iter().find(|(c, _)| **c == cc).map(|(_, l)| *l)
}

/// ISO 7064 mod 97-10 over an IBAN without spaces (uppercase letters and digits).
pub(crate) fn iban_mod97(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let mut rem: u32 = 0;
    let (head, tail) = iban.split_at(4);
    for &c in tail.iter().chain(head.iter()) {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97,
            _ => return false,
        }
    }
    rem == 1
}

/// IBAN check digits for a country code and BBAN (used by the corpus generator and tests).
pub fn iban_check_digits(cc: &str, bban: &str) -> String {
    let mut rem: u32 = 0;
    for c in bban.bytes().chain(cc.bytes()).chain(*b"00") {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97,
            _ => {}
        }
    }
    format!("{:02}", 98 - rem)
}

/// The Luhn check digit that completes `partial` (used by the corpus generator and tests).
pub fn luhn_check_digit(partial: &str) -> char {
    for d in b'0'..=b'9' {
        let mut v = partial.as_bytes().to_vec();
        v.push(d);
        if luhn(&v) {
            return char::from(d);
        }
    }
    '0'
}

/// US SSN rules: area not 000, 666 or 900-999; group not 00; serial not 0000; plus two numbers
/// that were famously published (078-05-1120, 219-09-9999).
pub(crate) fn ssn_ok(area: u32, group: u32, serial: u32) -> bool {
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !(area == 78 && group == 5 && serial == 1120)
        && !(area == 219 && group == 9 && serial == 9999)
}

/// UK National Insurance number prefix rules.
pub(crate) fn nino_prefix_ok(a: u8, b: u8) -> bool {
    if !a.is_ascii_uppercase() || !b.is_ascii_uppercase() {
        return false;
    }
    if b"DFIQUV".contains(&a) || b"DFIOQUV".contains(&b) {
        return false;
    }
    !matches!(
        &[a, b],
        b"BG" | b"GB" | b"KN" | b"NK" | b"NT" | b"TN" | b"ZZ"
    )
}

/// The control letter of a Spanish DNI number (also used for NIE after X/Y/Z -> 0/1/2).
pub fn dni_letter(n: u32) -> u8 {
    b"TRWAGMYFPDXBNJZSQVHLCKE"[(n % 23) as usize]
}

/// Shannon entropy in bits per byte.
pub(crate) fn entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Decode base64 in any of the common spellings (standard or URL-safe, padded or not).
pub(crate) fn b64_decode_any(s: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let url = s.iter().any(|&b| b == b'-' || b == b'_');
    let padded = s.last() == Some(&b'=');
    let engine = match (url, padded) {
        (true, true) => &URL_SAFE,
        (true, false) => &URL_SAFE_NO_PAD,
        (false, true) => &STANDARD,
        (false, false) => &STANDARD_NO_PAD,
    };
    engine.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_known_numbers() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"378282246310005"));
        assert!(!luhn(b"4111111111111112"));
        assert_eq!(luhn_check_digit("411111111111111"), '1');
    }

    #[test]
    fn iban_checks() {
        assert!(iban_mod97(b"DE89370400440532013000"));
        assert!(iban_mod97(b"GB82WEST12345698765432"));
        assert!(!iban_mod97(b"DE88370400440532013000"));
        assert_eq!(iban_check_digits("DE", "370400440532013000"), "89");
        assert_eq!(iban_len(*b"DE"), Some(22));
        assert_eq!(iban_len(*b"ZZ"), None);
    }

    #[test]
    fn ssn_nino_dni_rules() {
        assert!(ssn_ok(123, 45, 6789));
        assert!(!ssn_ok(0, 45, 6789));
        assert!(!ssn_ok(666, 45, 6789));
        assert!(!ssn_ok(900, 45, 6789));
        assert!(!ssn_ok(123, 0, 6789));
        assert!(!ssn_ok(123, 45, 0));
        assert!(nino_prefix_ok(b'A', b'B'));
        assert!(!nino_prefix_ok(b'G', b'B'));
        assert!(!nino_prefix_ok(b'D', b'A'));
        assert!(!nino_prefix_ok(b'A', b'O'));
        assert_eq!(dni_letter(12345678), b'Z');
    }

    #[test]
    fn entropy_orders_values() {
        assert!(entropy(b"aaaaaaaa") < 0.01);
        assert!(entropy(b"q8Zr2LmX9vTn4KpW") > 3.5);
    }
}
