//! `strftime_now(format)`, the template global transformers provides (Python's
//! `datetime.now().strftime(format)` with glibc's C-locale directives). The clock is read in UTC: the
//! server has no time-zone database, and templates only use it to print today's date.

use std::time::{SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The template function: formats the current UTC time.
pub(crate) fn strftime_now(format: String) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, now)
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday
    weekday: u32,
    /// 0-based day of the year
    yday: u32,
    unix: i64,
}

impl Civil {
    fn from_unix(unix: i64) -> Self {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            weekday: (days + 4).rem_euclid(7) as u32,
            yday: (days - days_from_civil(year, 1, 1)) as u32,
            unix,
        }
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of `civil_from_days`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats `unix` seconds (UTC, as a naive datetime: `%Z`/`%z` are empty) like glibc's strftime.
/// Supports the `-` (no padding) and `_` (space padding) flags; unknown directives are kept as written.
pub(crate) fn strftime(format: &str, unix: i64) -> String {
    let t = Civil::from_unix(unix);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let flag = match chars.peek() {
            Some(&f @ ('-' | '_')) => {
                chars.next();
                Some(f)
            }
            _ => None,
        };
        match chars.next() {
            Some(directive) => match expand(directive, &t, flag) {
                Some(text) => out.push_str(&text),
                None => {
                    out.push('%');
                    out.extend(flag);
                    out.push(directive);
                }
            },
            None => {
                out.push('%');
                out.extend(flag);
            }
        }
    }
    out
}

/// One directive, or `None` when it is not supported.
fn expand(directive: char, t: &Civil, flag: Option<char>) -> Option<String> {
    let num = |value: i64, width: usize, pad: char| pad_number(value, width, flag.or(Some(pad)));
    let hour12 = if t.hour.is_multiple_of(12) {
        12
    } else {
        t.hour % 12
    };
    let weekday = WEEKDAYS[t.weekday as usize];
    let month = MONTHS[t.month as usize - 1];
    Some(match directive {
        'a' => weekday[..3].to_string(),
        'A' => weekday.to_string(),
        'b' | 'h' => month[..3].to_string(),
        'B' => month.to_string(),
        'c' => strftime("%a %b %e %H:%M:%S %Y", t.unix),
        'C' => num(t.year.div_euclid(100), 2, '0'),
        'd' => num(t.day.into(), 2, '0'),
        'D' | 'x' => strftime("%m/%d/%y", t.unix),
        'e' => num(t.day.into(), 2, '_'),
        'F' => strftime("%Y-%m-%d", t.unix),
        'H' => num(t.hour.into(), 2, '0'),
        'I' => num(hour12.into(), 2, '0'),
        'j' => num(i64::from(t.yday) + 1, 3, '0'),
        'm' => num(t.month.into(), 2, '0'),
        'M' => num(t.minute.into(), 2, '0'),
        'n' => "\n".to_string(),
        'p' => if t.hour < 12 { "AM" } else { "PM" }.to_string(),
        'R' => strftime("%H:%M", t.unix),
        's' => t.unix.to_string(),
        'S' => num(t.second.into(), 2, '0'),
        't' => "\t".to_string(),
        'T' | 'X' => strftime("%H:%M:%S", t.unix),
        'u' => (if t.weekday == 0 { 7 } else { t.weekday }).to_string(),
        'U' => num(((t.yday + 7 - t.weekday) / 7).into(), 2, '0'),
        'w' => t.weekday.to_string(),
        'W' => num(((t.yday + 7 - (t.weekday + 6) % 7) / 7).into(), 2, '0'),
        'y' => num(t.year.rem_euclid(100), 2, '0'),
        'Y' => t.year.to_string(),
        'Z' | 'z' => String::new(),
        '%' => "%".to_string(),
        _ => return None,
    })
}

/// Pads to `width` with zeros ('0'), spaces ('_'), or not at all ('-').
fn pad_number(value: i64, width: usize, pad: Option<char>) -> String {
    match pad {
        Some('-') => value.to_string(),
        Some('_') => format!("{value:>width$}"),
        _ => format!("{value:0width$}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for days in [-719_468, -1, 0, 11_016, 19_930, 47_481, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn llama_date_string() {
        // 2024-07-26 00:00:00 UTC, the default date of Llama 3.1's template.
        assert_eq!(strftime("%d %b %Y", 1_721_952_000), "26 Jul 2024");
    }

    #[test]
    fn flags_and_unknown_directives() {
        assert_eq!(strftime("%-d/%_m|%Q|%", 1_721_952_000), "26/ 7|%Q|%");
    }

    #[test]
    fn now_is_a_plausible_date() {
        let year: i64 = strftime_now("%Y".to_string()).parse().unwrap();
        assert!(year >= 2024);
    }
}
