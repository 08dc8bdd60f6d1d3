use agentgate_masking::*;

#[test]
fn smoke() {
    let m = Masker::new(&MaskingConfig::recommended(), None).expect("config");
    let mut r = MaskReport::new();
    for s in [
        "mail ann@example.com, card 4111 1111 1111 1111 ok",
        "ssn 123-45-6789 phone (415) 555-2671 and +44 20 7946 0958",
        "iban DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432",
        "ip 192.168.1.20 and 2001:db8::8a2e:370:7334 and fe80::1",
        "key AKIAIOSFODNN7EXAMPLE token ghp_abcdefghijklmnopqrstuvwxyz0123456789 slack xoxb-1234567890-abcdefghij",
        "jwt eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U end",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabc+/=\n-----END RSA PRIVATE KEY-----\nafter",
        "DATABASE_URL=postgres://app:s3cret@db:5432/app",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "time 12:34:56 std::vector 2024-01-15 v1.2.3 4111111111111112",
    ] {
        println!("{s}\n => {}\n", m.mask_text(s, &mut r));
    }
    println!("{r:?}");
}
