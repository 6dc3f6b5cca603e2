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
    pub fn new(expr: &str) -> Permitted {
        let compile = |re: String| Regex::new(&re).map_err(|e| e.to_string());
        Permitted {
            expr: expr.to_string(),
            strict: compile(format!("^(?:{expr})$")),
            loose: compile(expr.to_string()),
        }
    }

    /// The anchored (`strict`) or unanchored form, or why it does not compile.
    pub fn regex(&self, strict: bool) -> Result<&Regex, &str> {
        let compiled = if strict { &self.strict } else { &self.loose };
        compiled.as_ref().map_err(String::as_str)
    }
}
