//! A small arithmetic expression language for verifiers: non-negative integer
//! literals, `+ - * /`, parentheses, spaces. Parsed by recursive descent with
//! bounded length and depth, evaluated exactly over rationals. Nothing is ever
//! handed to an interpreter.

use std::fmt;

/// Longest expression accepted, in bytes.
const MAX_LEN: usize = 256;
/// Deepest parenthesis nesting accepted.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Num(i64),
    Bin(char, Box<Expr>, Box<Expr>),
}

/// An exact fraction `num / den` with `den > 0`, in lowest terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    pub num: i128,
    pub den: i128,
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Rational {
    /// `num / den` in lowest terms with a positive denominator; `None` for a
    /// zero denominator or a value that does not fit (never a panic: inputs
    /// come from untrusted responses).
    pub fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = i128::try_from(gcd(num.unsigned_abs(), den.unsigned_abs()).max(1)).ok()?;
        let (num, den) = (num / g, den / g);
        if den < 0 {
            Some(Rational { num: num.checked_neg()?, den: den.checked_neg()? })
        } else {
            Some(Rational { num, den })
        }
    }
    pub fn int(n: i64) -> Self {
        Rational { num: n as i128, den: 1 }
    }
}

impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

impl Expr {
    /// Exact value; `None` on division by zero or overflow.
    pub fn eval(&self) -> Option<Rational> {
        match self {
            Expr::Num(n) => Some(Rational::int(*n)),
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval()?, b.eval()?);
                match op {
                    '+' => Rational::new(a.num.checked_mul(b.den)?.checked_add(b.num.checked_mul(a.den)?)?, a.den.checked_mul(b.den)?),
                    '-' => Rational::new(a.num.checked_mul(b.den)?.checked_sub(b.num.checked_mul(a.den)?)?, a.den.checked_mul(b.den)?),
                    '*' => Rational::new(a.num.checked_mul(b.num)?, a.den.checked_mul(b.den)?),
                    '/' => Rational::new(a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?),
                    _ => None,
                }
            }
        }
    }

    /// The integer literals in the expression, left to right.
    pub fn numbers(&self) -> Vec<i64> {
        match self {
            Expr::Num(n) => vec![*n],
            Expr::Bin(_, a, b) => {
                let mut v = a.numbers();
                v.extend(b.numbers());
                v
            }
        }
    }
}

/// Parses `text` or says why not.
pub fn parse_expression(text: &str) -> Result<Expr, String> {
    if text.len() > MAX_LEN {
        return Err(format!("expression longer than {MAX_LEN} bytes"));
    }
    let mut p = Parser { s: text.as_bytes(), i: 0, depth: 0 };
    let e = p.sum()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected `{}` at byte {}", p.s[p.i] as char, p.i));
    }
    Ok(e)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }
    // sum := product (('+' | '-') product)*
    fn sum(&mut self) -> Result<Expr, String> {
        let mut e = self.product()?;
        while let Some(c @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            e = Expr::Bin(c as char, Box::new(e), Box::new(self.product()?));
        }
        Ok(e)
    }
    // product := atom (('*' | '/') atom)*
    fn product(&mut self) -> Result<Expr, String> {
        let mut e = self.atom()?;
        while let Some(c @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            e = Expr::Bin(c as char, Box::new(e), Box::new(self.atom()?));
        }
        Ok(e)
    }
    // atom := integer | '(' sum ')'
    fn atom(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(b'(') => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(format!("nesting deeper than {MAX_DEPTH}"));
                }
                self.i += 1;
                let e = self.sum()?;
                if self.peek() != Some(b')') {
                    return Err(format!("expected `)` at byte {}", self.i));
                }
                self.i += 1;
                self.depth -= 1;
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.i]).expect("ascii digits");
                digits.parse::<i64>().map(Expr::Num).map_err(|_| format!("number `{digits}` too large"))
            }
            Some(c) => Err(format!("unexpected `{}` at byte {}", c as char, self.i)),
            None => Err("unexpected end of expression".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_rationals_are_refused_not_a_panic() {
        // i128::MIN % -1 and -i128::MIN overflow; both used to panic.
        assert_eq!(Rational::new(i128::MIN, -1), None);
        assert_eq!(Rational::new(0, i128::MIN), None);
        assert_eq!(Rational::new(i128::MIN, 1), Some(Rational { num: i128::MIN, den: 1 }));
        assert_eq!(Rational::new(i128::MIN, 2), Some(Rational { num: i128::MIN / 2, den: 1 }));
        assert_eq!(Rational::new(6, -4), Some(Rational { num: -3, den: 2 }));
        assert_eq!(Rational::new(0, -5), Some(Rational { num: 0, den: 1 }));
        // Through the parser: huge products overflow to "no value", not a crash.
        let big = "9223372036854775807*9223372036854775807*9223372036854775807";
        assert!(parse_expression(big).map(|e| e.eval()).ok().flatten().is_none());
    }

    fn val(s: &str) -> String {
        parse_expression(s).unwrap().eval().unwrap().to_string()
    }

    #[test]
    fn precedence_parentheses_and_fractions() {
        assert_eq!(val("2+3*4"), "14");
        assert_eq!(val("(2+3)*4"), "20");
        assert_eq!(val("10-4-3"), "3");
        assert_eq!(val("8/4/2"), "1");
        assert_eq!(val("1/3+1/6"), "1/2");
        assert_eq!(val(" 7 * ( 6 - 1 ) "), "35");
        assert_eq!(val("3-5"), "-2");
    }

    #[test]
    fn rejects_junk_without_panicking() {
        for bad in ["", "2+", "(1+2", "1+2)", "import os", "__import__('os')", "2**3", "-1", "1e5", "99999999999999999999"] {
            assert!(parse_expression(bad).is_err(), "{bad}");
        }
        assert!(parse_expression(&"(".repeat(100)).is_err());
        assert!(parse_expression(&"1+".repeat(200)).is_err());
        assert_eq!(parse_expression("1/0").unwrap().eval(), None);
    }
}
