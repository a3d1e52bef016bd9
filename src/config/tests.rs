//! Parsing, defaults and error reporting of the configuration file.

use super::units::{parse_duration, parse_size};
use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("/etc/wsgate/test.toml"), text)
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = parse("").unwrap();
    assert_eq!(c.server.listen.len(), 2);
    assert_eq!(c.server.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.server.max_connections.get(), 50_000);
    assert_eq!(c.server.max_request_head, 32 * 1024);
    let r = parse("[[routes]]\npath = \"/\"\nbackends = [\"a:1\"]\n").unwrap();
    assert_eq!(r.routes[0].websocket.max_frame_size, 16 * 1024 * 1024);
    assert_eq!(r.routes[0].websocket.idle_timeout, Duration::from_secs(600));
    assert_eq!(r.routes[0].websocket.max_message_size, 0);
    assert_eq!(c.limits.per_ip_burst, 40);
    assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
    assert_eq!(
        c.tls.default.as_ref().unwrap().0.value,
        PathBuf::from("/etc/wsgate/certs/localhost.pem")
    );
}

#[test]
fn bare_number_duration_is_an_error_naming_line_and_key() {
    let e = parse("[websocket]\n\nping_interval = 30\n").unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("test.toml:3: websocket.ping_interval: 30 has no unit"),
        "{s}"
    );
    let e = parse("[websocket]\nping_interval = \"30\"\n").unwrap_err();
    assert!(e.to_string().contains(":2: websocket.ping_interval"), "{e}");
}

#[test]
fn unknown_key_names_line_and_key() {
    let e = parse("[limits]\nper_ip_rat = 3\n").unwrap_err();
    let s = e.to_string();
    assert!(s.contains("test.toml:2: limits.per_ip_rat"), "{s}");
    assert!(s.contains("unknown field"), "{s}");
}

#[test]
fn every_semantic_error_is_reported() {
    let text = "[server]\nhandshake_timeout = \"soon\"\nmax_request_head = \"12 parsecs\"\n\
                [[routes]]\npath = \"chat\"\nbackends = [\"nowhere\"]\n";
    let e = parse(text).unwrap_err();
    assert_eq!(e.0.len(), 4, "{e}");
    assert_eq!(e.0[0].line, 2);
    assert_eq!(e.0[1].line, 3);
    assert_eq!(e.0[2].key, "routes[0].path");
    assert_eq!(e.0[3].key, "routes[0].backends");
}

#[test]
fn sizes_and_durations_parse_with_units() {
    assert_eq!(parse_size("64KiB").unwrap(), 65536);
    assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
    assert_eq!(parse_size("100").unwrap(), 100);
    assert!(parse_size("3 furlongs").is_err());
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert!(parse_duration("10").is_err());
}

#[test]
fn relative_paths_resolve_against_config_folder() {
    let c = parse("[[routes]]\npath = \"/s\"\nbackends = [\"unix:run/app.sock\"]\n").unwrap();
    assert_eq!(
        c.routes[0].backends[0].target,
        Backend::Unix(PathBuf::from("/etc/wsgate/run/app.sock"))
    );
}

/// The fields serde accepts in a table, read off its "unknown field" message.
fn fields_of(table: &str) -> Vec<String> {
    let text = if table.is_empty() {
        "zz_unknown = 1\n".to_string()
    } else if table == "routes" || table == "auth" {
        format!("[[{table}]]\nzz_unknown = 1\n")
    } else if table == "routes.health" {
        "[[routes]]\n[routes.health]\nzz_unknown = 1\n".to_string()
    } else {
        format!("[{table}]\nzz_unknown = 1\n")
    };
    let msg = parse(&text).unwrap_err().to_string();
    let list = msg
        .split_once("expected")
        .unwrap_or_else(|| panic!("no field list in {msg}"))
        .1;
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_defaults_table_names_every_key_the_parser_accepts() {
    let mut from_serde: Vec<String> = Vec::new();
    for table in fields_of("")
        .into_iter()
        .chain(["routes.health".to_string()])
    {
        for key in fields_of(&table) {
            from_serde.push(format!("{table}.{key}"));
        }
    }
    from_serde.sort();
    let mut documented: Vec<String> = defaults::DOCUMENTED
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    documented.sort();
    assert_eq!(documented, from_serde);
}

#[test]
fn writing_every_default_out_changes_nothing() {
    let mut text = String::new();
    let mut section = "";
    for (key, value) in defaults::DOCUMENTED {
        let (table, name) = key.split_once('.').unwrap();
        // client_auth's default holds only beside a client_ca, and [cluster]'s only beside a
        // redis URL: written alone they are errors.
        if table == "routes"
            || table == "auth"
            || table == "cluster"
            || table == "acme"
            || table.starts_with("routes.")
            || *key == "tls.client_auth"
            || value.parse::<toml::Value>().is_err()
        {
            continue;
        }
        // A TOML literal default: written out, it must mean what leaving it out means.
        if toml::from_str::<toml::Table>(&format!("k = {value}")).is_err() {
            continue;
        }
        if table != section {
            text.push_str(&format!("[{table}]\n"));
            section = table;
        }
        text.push_str(&format!("{name} = {value}\n"));
    }
    let explicit = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let implicit = parse("").unwrap();
    // Only where the values came from may differ.
    let unsourced = |c: &Config| {
        let s = format!("{c:?}");
        let mut out = String::new();
        let mut rest = s.as_str();
        while let Some(i) = rest.find("line: ") {
            out.push_str(&rest[..i + 6]);
            rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out + rest
    };
    assert_eq!(unsourced(&explicit), unsourced(&implicit), "{text}");
    let route = "[[routes]]\npath = \"/\"\nbackends = [\"a:1\"]\n";
    let full = format!("{route}allowed_origins = []\nallow_missing_origin = false\n");
    assert_eq!(
        format!("{:?}", parse(route).unwrap().routes),
        format!("{:?}", parse(&full).unwrap().routes)
    );
}

#[test]
fn the_readme_reference_lists_exactly_these_keys_and_defaults() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("## Configuration reference")
        .expect("a configuration reference");
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut table = String::new();
    let mut found: Vec<(String, String)> = Vec::new();
    for line in section.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            table = h
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches(|c| c == '[' || c == ']' || c == '`')
                .to_string();
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[0]
            .trim_end_matches('`')
            .trim_matches(|c| c == '[' || c == ']');
        let default = cells[1].trim().trim_matches('`').to_string();
        let key = if key.contains('.') {
            key.to_string()
        } else {
            format!("{table}.{key}")
        };
        found.push((key, default));
    }
    let documented: Vec<(String, String)> = defaults::DOCUMENTED
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut a = found.clone();
    let mut b = documented.clone();
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "README rows (left) against the code's defaults (right)"
    );
}

#[test]
fn acme_is_checked_without_contacting_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[acme]\ndomains = [\"chat.example.com\"]\nstorage = \"{}\"\n",
        dir.path().join("acme").display()
    );
    let c = parse(&good).unwrap();
    let a = c.acme.as_ref().unwrap();
    assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);
    assert_eq!(a.renew_before, RenewBefore::Fraction { num: 1, den: 3 });
    assert_eq!(a.directory, defaults::ACME_DIRECTORY);
    // With [acme] and no [tls] keys there is no default certificate.
    assert!(c.tls.default.is_none());

    let bad = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[acme]\n\
         directory = \"http://acme.example/dir\"\n\
         contact = [\"ops@example.com\"]\n\
         domains = [\"*.example.com\", \"10.0.0.1\", \"bad_name.example\", \"ok.example\", \"ok.example\"]\n\
         storage = \"{}\"\n\
         challenge = \"http-01\"\n\
         renew_before = \"3/2\"\n\
         eab_kid = \"kid\"\n",
        dir.path().join("file").join("acme").display()
    );
    std::fs::write(dir.path().join("file"), "not a folder").unwrap();
    let text = parse(&bad).unwrap_err().to_string();
    for needle in [
        ":4: acme.directory: \"http://acme.example/dir\" is not an https:// URL",
        ":5: acme.contact: \"ops@example.com\" is not a contact URI",
        "acme.domains: \"*.example.com\" is a wildcard",
        "acme.domains: \"10.0.0.1\" is an IP address",
        "acme.domains: \"bad_name.example\" is not a DNS name",
        "acme.domains: \"ok.example\" is listed twice",
        "acme.storage:",
        "Not a directory",
        ":8: acme.challenge: http-01 is answered on the plain listeners",
        ":9: acme.renew_before: \"3/2\" must be a fraction between 0 and 1",
        ":10: acme.eab_hmac_key_file: eab_kid is set",
    ] {
        assert!(text.contains(needle), "{needle}\nnot in\n{text}");
    }
    assert!(
        parse("[acme]\nstorage = \"/tmp\"\n")
            .unwrap_err()
            .to_string()
            .contains("acme.domains: required in [acme]")
    );
    assert_eq!(
        super::build::parse_renew_before("30d").unwrap(),
        RenewBefore::Left(Duration::from_secs(30 * 86400))
    );
    assert!(super::build::parse_renew_before("0s").is_err());
    assert!(super::build::parse_renew_before("30").is_err());
}
