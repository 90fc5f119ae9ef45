//! The registry credential file and its lookup rules.

use std::fs;

use overlaybd::credentials::{base64_decode, candidate_keys, Credential, Credentials};
use overlaybd::Error;

const BLOB: &str = "https://registry.example.com/v2/team/app/blobs/sha256:abcd";

fn creds(text: &str) -> Credentials {
    Credentials::from_json(text, "cred.json").unwrap()
}

fn user_of(c: &Credentials, url: &str) -> Option<String> {
    c.lookup(url).map(|cred| cred.username.clone())
}

fn err_text(text: &str) -> String {
    match Credentials::from_json(text, "/opt/overlaybd/cred.json") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn both_entry_forms() {
    // "dXNlcjI6cGE6c3M=" is base64("user2:pa:ss"): the password keeps its colon.
    let c = creds(
        r#"{"auths": {
            "a.example.com": {"username": "user1", "password": "secret1"},
            "b.example.com": {"auth": "dXNlcjI6cGE6c3M="}
        }}"#,
    );
    let a = c
        .lookup("https://a.example.com/v2/x/blobs/sha256:1")
        .unwrap();
    assert_eq!(
        (a.username.as_str(), a.password.as_str()),
        ("user1", "secret1")
    );
    let b = c
        .lookup("https://b.example.com/v2/x/blobs/sha256:1")
        .unwrap();
    assert_eq!(
        (b.username.as_str(), b.password.as_str()),
        ("user2", "pa:ss")
    );
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        ["a.example.com", "b.example.com"]
    );
}

#[test]
fn candidate_keys_for_blob_urls() {
    assert_eq!(
        candidate_keys(BLOB),
        [
            "registry.example.com",
            "registry.example.com/team",
            "registry.example.com/team/app"
        ]
    );
    // Deeper repositories: one key per component.
    assert_eq!(
        candidate_keys("https://h:5000/v2/a/b/c/blobs/sha256:1"),
        ["h:5000", "h:5000/a", "h:5000/a/b", "h:5000/a/b/c"]
    );
    // repoBlobUrl itself, plain http, a query string.
    assert_eq!(
        candidate_keys("http://h/v2/ns/repo/blobs"),
        ["h", "h/ns", "h/ns/repo"]
    );
    assert_eq!(
        candidate_keys("https://h/v2/ns/repo/blobs/sha256:1?x=y/z"),
        ["h", "h/ns", "h/ns/repo"]
    );
    // A repository component named "blobs" is still part of the repository.
    assert_eq!(
        candidate_keys("https://h/v2/ns/blobs/blobs/sha256:1"),
        ["h", "h/ns", "h/ns/blobs"]
    );
    // Not a registry v2 path: the host only. No host: nothing.
    assert_eq!(candidate_keys("https://h/other/path"), ["h"]);
    assert_eq!(candidate_keys("h"), ["h"]);
    assert!(candidate_keys("https:///v2/x").is_empty());
    assert!(candidate_keys("").is_empty());
}

#[test]
fn the_first_matching_entry_in_document_order_wins() {
    // Alphabetical order (what serde_json's own map gives) would put "registry.example.com" first.
    let c = creds(
        r#"{"auths": {
            "registry.example.com/team/app": {"username": "repo"},
            "registry.example.com/team": {"username": "ns"},
            "registry.example.com": {"username": "host"}
        }}"#,
    );
    assert_eq!(user_of(&c, BLOB).as_deref(), Some("repo"));
    assert_eq!(
        user_of(
            &c,
            "https://registry.example.com/v2/team/other/blobs/sha256:1"
        )
        .as_deref(),
        Some("ns")
    );
    assert_eq!(
        user_of(
            &c,
            "https://registry.example.com/v2/elsewhere/blobs/sha256:1"
        )
        .as_deref(),
        Some("host")
    );

    let c = creds(
        r#"{"auths": {
            "registry.example.com": {"username": "host"},
            "registry.example.com/team/app": {"username": "repo"}
        }}"#,
    );
    assert_eq!(user_of(&c, BLOB).as_deref(), Some("host"));

    // A duplicated key: the first occurrence wins.
    let c = creds(
        r#"{"auths": {"registry.example.com": {"username": "first"},
                      "registry.example.com": {"username": "second"}}}"#,
    );
    assert_eq!(user_of(&c, BLOB).as_deref(), Some("first"));
}

#[test]
fn keys_must_match_exactly() {
    let c = creds(
        r#"{"auths": {"https://registry.example.com": {"username": "scheme"},
                      "registry.example.com/te": {"username": "prefix"},
                      "REGISTRY.example.com": {"username": "case"}}}"#,
    );
    assert_eq!(c.lookup(BLOB), None);
    assert_eq!(c.lookup("not a url"), None);
}

#[test]
fn entries_without_credentials_are_dropped() {
    let c = creds(
        r#"{"auths": {"registry.example.com": {}, "registry.example.com/team": {"username": "u"},
                      "x": {"email": "a@b", "auth": ""}}, "credsStore": "desktop"}"#,
    );
    assert_eq!(c.keys().collect::<Vec<_>>(), ["registry.example.com/team"]);
    let found = c.lookup(BLOB).unwrap();
    assert_eq!(found.password, "", "a missing password is empty");

    assert_eq!(creds("{}"), Credentials::default());
    assert_eq!(creds(r#"{"auths": null}"#), Credentials::default());
}

#[test]
fn auth_wins_over_username_and_password() {
    // "YTpi" is base64("a:b").
    let c = creds(r#"{"auths": {"h": {"username": "u", "password": "p", "auth": "YTpi"}}}"#);
    let found = c.lookup("https://h/v2/r/blobs/x").unwrap();
    assert_eq!(
        (found.username.as_str(), found.password.as_str()),
        ("a", "b")
    );
}

#[test]
fn bad_auth_values_are_errors_that_do_not_leak_them() {
    let msg = err_text(r#"{"auths": {"h/ns": {"auth": "c2VjcmV0!"}}}"#);
    assert!(
        msg.starts_with("/opt/overlaybd/cred.json: not a valid credential file: line 1"),
        "{msg}"
    );
    assert!(
        msg.contains("auths entry \"h/ns\": `auth` is not valid base64"),
        "{msg}"
    );
    assert!(!msg.contains("c2VjcmV0"), "{msg}");

    // "c2VjcmV0" is base64("secret"): no colon.
    let msg = err_text(r#"{"auths": {"h": {"auth": "c2VjcmV0"}}}"#);
    assert!(msg.contains("does not decode to `user:password`"), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");

    // "/w==" is base64 of the byte 0xFF.
    let msg = err_text(r#"{"auths": {"h": {"auth": "/w=="}}}"#);
    assert!(msg.contains("does not decode to UTF-8"), "{msg}");
}

#[test]
fn malformed_files_name_the_file() {
    let msg = err_text(r#"{"auths": ["h"]}"#);
    assert!(
        msg.contains("expected a map from registry key to credentials"),
        "{msg}"
    );
    let msg = err_text(r#"{"auths": {"h": {"username": 7}}}"#);
    assert!(
        msg.contains("invalid type: integer `7`, expected a string"),
        "{msg}"
    );
    let msg = err_text("{\"auths\": {\"h\": ");
    assert!(msg.contains("EOF while parsing"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cred.json");
    fs::write(&path, "{,}").unwrap();
    let err = Credentials::load(&path).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    let err = Credentials::load(dir.path().join("absent")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");

    fs::write(
        &path,
        r#"{"auths": {"registry.example.com": {"username": "u", "password": "p"}}}"#,
    )
    .unwrap();
    assert_eq!(
        user_of(&Credentials::load(&path).unwrap(), BLOB).as_deref(),
        Some("u")
    );
}

#[test]
fn passwords_never_appear_in_debug_output() {
    let c = creds(
        r#"{"auths": {"h": {"username": "alice", "password": "hunter2"},
                      "g": {"auth": "Ym9iOnMzY3JldA=="}}}"#,
    );
    let shown = format!("{c:?} {c:#?}");
    assert!(shown.contains("alice") && shown.contains("bob"), "{shown}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert!(shown.contains("<redacted>"), "{shown}");
    let one = Credential {
        username: "u".into(),
        password: "pw-value".into(),
    };
    assert!(!format!("{one:?}").contains("pw-value"));
}

#[test]
fn credential_server_answers() {
    let c = Credentials::from_http_response(
        r#"{"traceId": "t-1", "success": true,
            "data": {"auths": {"registry.example.com/team": {"username": "u", "password": "p"}}}}"#,
        "http://127.0.0.1/auth",
    )
    .unwrap();
    assert_eq!(user_of(&c, BLOB).as_deref(), Some("u"));

    let err = Credentials::from_http_response(r#"{"traceId": "t-2", "success": false}"#, "server")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server") && err.contains("reported failure") && err.contains("t-2"),
        "{err}"
    );

    let c = Credentials::from_http_response(r#"{"success": true}"#, "server").unwrap();
    assert_eq!(c, Credentials::default());
}

#[test]
fn base64_with_and_without_padding() {
    let cases: [(&str, &[u8]); 7] = [
        ("", b""),
        ("Zg", b"f"),
        ("Zm8", b"fo"),
        ("Zm9v", b"foo"),
        ("Zm9vYg", b"foob"),
        ("Zm9vYmE", b"fooba"),
        ("Zm9vYmFy", b"foobar"),
    ];
    for (unpadded, expected) in cases {
        assert_eq!(
            base64_decode(unpadded).as_deref(),
            Some(expected),
            "{unpadded}"
        );
        let padded = format!("{unpadded}{}", "=".repeat((4 - unpadded.len() % 4) % 4));
        assert_eq!(
            base64_decode(&padded).as_deref(),
            Some(expected),
            "{padded}"
        );
    }
    assert_eq!(
        base64_decode("+/+/").as_deref(),
        Some(&[0xFB, 0xFF, 0xBF][..])
    );
    assert_eq!(
        base64_decode("AAECAwQFBgcICQ==").unwrap(),
        (0..10).collect::<Vec<u8>>()
    );
}

#[test]
fn invalid_base64_is_rejected() {
    for bad in [
        "Z",        // a lone character cannot encode a byte
        "Zm9vY",    // length 1 mod 4
        "Zg=",      // padding that does not complete a quantum
        "Zg===",    // too much padding
        "Zm9v=",    // padding after a full quantum
        "=",        // padding only
        "Zg==Zg==", // padding in the middle
        "Zm-v",     // URL-safe alphabet
        "Zm_v",     // URL-safe alphabet
        "Zm9 v",    // whitespace
        "Zm9v\n",   // newline
        "Zh",       // non-zero bits after the last byte
        "Zm9=",     // non-zero bits after the last byte, padded
        "Zé==",     // non-ASCII
    ] {
        assert_eq!(base64_decode(bad), None, "{bad:?}");
    }
}
