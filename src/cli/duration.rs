//! Go-style durations (`15m`, `1s`, `500ms`, `1h30m`), as kiam's flags take them.

use std::time::Duration;

/// Parses a Go `time.ParseDuration` string: a sequence of decimal numbers, each with a unit
/// (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`). `0` alone is allowed; negative durations are not,
/// because no kiam flag means anything by them.
pub fn parse(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err(format!("invalid duration {input:?}: negative durations are not allowed"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("invalid duration {input:?}: missing unit"))?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 =
            num.parse().map_err(|_| format!("invalid duration {input:?}: bad number {num:?}"))?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("invalid duration {input:?}: unknown unit {unit:?}")),
        };
        total += value * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("invalid duration {input:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_syntax() {
        let cases = [
            ("15m", Duration::from_secs(900)),
            ("1s", Duration::from_secs(1)),
            ("500ms", Duration::from_millis(500)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("0", Duration::ZERO),
            ("10us", Duration::from_micros(10)),
            ("2m3s", Duration::from_secs(123)),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for input in ["", "15", "m", "1x", "-1s", "1.2.3s", "s1"] {
            assert!(parse(input).is_err(), "{input} should be rejected");
        }
    }
}
