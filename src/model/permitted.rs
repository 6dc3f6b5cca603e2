//! A namespace's `iam.amazonaws.com/permitted` expression, compiled once when the namespace is
//! seen, so that every decision reuses it.

use regex::Regex;

/// The compiled expression, anchored and unanchored, so that the facts need not know the
/// server's `--disable-strict-namespace-regexp` flag.
#[derive(Clone, Debug)]
pub struct Permitted {
    /// The annotation text, for explanations.
    pub expr: String,
    strict: Result<Regex, String>,
    loose: Result<Regex, String>,
}

impl Permitted {
    /// Compiles `expr` both anchored and unanchored. kiam anchored by plain concatenation
    /// (`^a|b$`), which lets `b` match anywhere; the group here makes the anchors apply to every
    /// alternative.
    ///
    /// An expression that does not compile on its own is refused in both forms, even when the
    /// anchored text happens to compile: `role/a-.*)|(.*` closes the group early, and
    /// `^(?:role/a-.*)|(.*)$` would permit every ARN.
    pub fn new(expr: &str) -> Permitted {
        let compile = |re: String| Regex::new(&re).map_err(|e| e.to_string());
        let alone = compile(expr.to_string());
        let strict = match &alone {
            Ok(_) => compile(format!("^(?:{expr})$")),
            Err(error) => Err(format!("it does not compile on its own: {error}")),
        };
        let loose = alone.map_err(|error| format!("it does not compile on its own: {error}"));
        Permitted { expr: expr.to_string(), strict, loose }
    }

    /// The anchored (`strict`) or unanchored form, or why it does not compile.
    pub fn regex(&self, strict: bool) -> Result<&Regex, &str> {
        let compiled = if strict { &self.strict } else { &self.loose };
        compiled.as_ref().map_err(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expression_that_closes_the_anchoring_group_is_refused() {
        let escape = Permitted::new("arn:aws:iam::1:role/team-a-.*)|(.*");
        for strict in [true, false] {
            let error = escape.regex(strict).expect_err("does not compile alone");
            assert!(error.contains("does not compile on its own"), "{error}");
        }
        let fine = Permitted::new("arn:aws:iam::1:role/(team-a|team-b)-.*");
        let strict = fine.regex(true).expect("compiles");
        assert!(strict.is_match("arn:aws:iam::1:role/team-b-web"));
        assert!(!strict.is_match("arn:aws:iam::1:role/admin"));
    }
}
