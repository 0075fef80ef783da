//! MQTT topic names and filters as the ACL needs them: validity, matching, and containment of
//! one filter in another. Pure functions over strings.

/// Why a topic name or filter is not valid MQTT 3.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TopicSyntax {
    /// Empty string.
    #[error("empty topic")]
    Empty,
    /// Contains NUL.
    #[error("topic contains NUL")]
    Nul,
    /// A topic name (publish) with `+` or `#`.
    #[error("wildcard in a topic name")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("misplaced wildcard in a filter")]
    MisplacedWildcard,
    /// Longer than 65,535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
}

fn common(s: &str) -> Result<(), TopicSyntax> {
    if s.is_empty() {
        return Err(TopicSyntax::Empty);
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicSyntax::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicSyntax::Nul);
    }
    Ok(())
}

/// Checks a topic name (what PUBLISH and a will carry).
pub(crate) fn check_name(topic: &str) -> Result<(), TopicSyntax> {
    common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicSyntax::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter (what SUBSCRIBE carries).
pub(crate) fn check_filter(filter: &str) -> Result<(), TopicSyntax> {
    common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        let bad_hash = level.contains('#') && (*level != "#" || !last);
        let bad_plus = level.contains('+') && *level != "+";
        if bad_hash || bad_plus {
            return Err(TopicSyntax::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Whether `filter` matches the topic name `topic` (MQTT 3.1.1 section 4.7, including the rule
/// that wildcards in the first level do not match topics starting with `$`): the MQTT core's
/// matcher, so the ACL and the router never disagree on what a filter covers.
pub(crate) use fleet_mqtt::topic::matches;

/// Whether every topic that `inner` matches is also matched by `outer`: the containment test
/// that decides whether a subscription stays within what a rule allows. Sound (it never says
/// yes wrongly); `$`-topics are outside any filter whose first level is a wildcard, as in
/// [`matches()`].
pub(crate) fn within(inner: &str, outer: &str) -> bool {
    // A filter starting with a wildcard never matches `$` topics, so it cannot cover a filter
    // whose first level is a literal `$...`; other literal first levels are compared below.
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut i = inner.split('/');
    let mut o = outer.split('/');
    loop {
        match (i.next(), o.next()) {
            // `#` in outer covers whatever inner has left, including nothing (`a/#` matches
            // `a`).
            (_, Some("#")) => return true,
            // `#` in inner matches arbitrarily deep topics that outer (with no `#` here) does
            // not.
            (Some("#"), _) => return false,
            // `+` in outer covers any single level of inner, literal or `+`.
            (Some(_), Some("+")) => {}
            // A literal in outer covers only the same literal.
            (Some(il), Some(ol)) if il == ol => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax() {
        assert!(check_name("a/b").is_ok());
        assert!(check_name("/").is_ok());
        assert_eq!(check_name(""), Err(TopicSyntax::Empty));
        assert_eq!(check_name("a/+"), Err(TopicSyntax::WildcardInName));
        assert_eq!(check_name("a/#"), Err(TopicSyntax::WildcardInName));
        assert_eq!(check_name("a\0b"), Err(TopicSyntax::Nul));
        assert!(check_filter("a/+/#").is_ok());
        assert!(check_filter("#").is_ok());
        assert!(check_filter("+").is_ok());
        assert_eq!(check_filter("a/#/b"), Err(TopicSyntax::MisplacedWildcard));
        assert_eq!(check_filter("a/b#"), Err(TopicSyntax::MisplacedWildcard));
        assert_eq!(check_filter("a/+b"), Err(TopicSyntax::MisplacedWildcard));
        assert_eq!(check_filter(""), Err(TopicSyntax::Empty));
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn containment() {
        assert!(within("devices/d1/cmd", "devices/d1/cmd"));
        assert!(within("devices/d1/cmd", "devices/+/cmd"));
        assert!(within("devices/+/cmd", "devices/+/cmd"));
        assert!(!within("devices/+/cmd", "devices/d1/cmd"));
        assert!(!within("devices/d1/#", "devices/d1/cmd"));
        assert!(within("devices/d1/#", "devices/d1/#"));
        assert!(within("devices/d1", "devices/d1/#"));
        assert!(within("devices/d1/a/b", "devices/#"));
        assert!(!within("#", "devices/#"));
        assert!(!within("+/+/cmd", "devices/+/cmd"));
        assert!(!within("devices/d1/cmd/result", "devices/d1/cmd"));
        assert!(!within("devices/d1", "devices/d1/cmd"));
        assert!(!within("$SYS/#", "#"));
        assert!(!within("$SYS/x", "+/x"));
        assert!(within("$SYS/x", "$SYS/+"));
    }
}
