//! Topic names and filters (MQTT 3.1.1 section 4.7): validation and matching.

/// Whether `topic` is a valid topic name for a PUBLISH: not empty, no `+` or `#`, no NUL
/// [MQTT-4.7.3-1], [MQTT-3.3.2-2].
pub fn valid_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` is a valid topic filter: not empty, no NUL, `#` only as the whole last
/// level, `+` only as a whole level [MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1].
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether the valid filter `filter` matches the valid topic name `topic`. Filters starting
/// with a wildcard do not match topics starting with `$` [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_section_4_7() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/monitor", "$SYS/monitor"));
        assert!(matches("$SYS/#", "$SYS/monitor"));
    }

    #[test]
    fn filter_syntax() {
        for ok in ["#", "+", "a/+/b", "a/#", "/", "+/+", "a//b"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "a\0"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(valid_name("a/b"));
        assert!(!valid_name("a/+"));
        assert!(!valid_name(""));
    }
}
