//! Mends a known bug in the spice-html5 client the html5 port serves, so browser consoles do
//! not fail at random.
//!
//! spice-html5 (0.3.0, Debian's, and upstream at the time of writing) encrypts the SPICE ticket
//! with RSA-OAEP and turns the result into bytes through `BigInteger.toString(16)`, which drops
//! leading zero bytes. About one ciphertext in 128 to 256 starts with a zero byte; the client then
//! sends 127 bytes shifted left, the server's decryption fails and it answers the link with
//! "Permission denied" even without a password. Every channel of every console rolls that dice,
//! so a few percent of consoles lose their main or display channel. The mend left-pads the hex
//! string to the key length before it is split into bytes; a client that already pads is served
//! unchanged in effect (the loop does nothing).

/// The statement in `ticket.js`'s `rsa_encrypt` that loses the leading zeros.
const LOSSY: &str = "var h = enc.toString(16);";
/// The same statement followed by padding to the modulus length in hex digits.
const PADDED: &str =
    "var h = enc.toString(16); while (h.length < ((rsa.n.bitLength() + 7) >> 3) * 2) h = \"0\" + h; /* spice-operator: keep leading zero bytes */";

/// The bytes to serve for the file at `path` (relative to the static directory): `ticket.js`
/// with its RSA output padded, anything else as read.
pub fn mend(path: &str, bytes: Vec<u8>) -> Vec<u8> {
    if path.rsplit('/').next() != Some("ticket.js") {
        return bytes;
    }
    match String::from_utf8(bytes) {
        Ok(text) if text.contains("function rsa_encrypt") && text.matches(LOSSY).count() == 1 => text.replacen(LOSSY, PADDED, 1).into_bytes(),
        Ok(text) => text.into_bytes(),
        Err(e) => e.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rsa_encrypt` as spice-html5 0.3.0 ships it.
    const TICKET_JS: &str = r#"function rsa_encrypt(rsa, str)
{
    var i;
    var ret = [];
    var oaep = RSA_padding_add_PKCS1_OAEP((rsa.n.bitLength()+7)>>3, str);
    var bigint = new BigInteger(ba);
    var enc = rsa.doPublic(bigint);
    var h = enc.toString(16);
    if ((h.length & 1) != 0)
        h = "0" + h;
    for (i = 0; i < h.length; i += 2)
        ret[i / 2] = parseInt(h.substring(i, i + 2), 16);
    return ret;
}
"#;

    #[test]
    fn the_ticket_is_padded_to_the_key_length_before_it_becomes_bytes() {
        let served = String::from_utf8(mend("ticket.js", TICKET_JS.as_bytes().to_vec())).unwrap();
        assert!(served.contains("while (h.length < ((rsa.n.bitLength() + 7) >> 3) * 2) h = \"0\" + h;"), "{served}");
        // Padded before the odd-length fix and the byte loop, which then see the full length.
        assert!(served.find("while (h.length").unwrap() < served.find("if ((h.length & 1)").unwrap());
        assert_eq!(served.lines().count(), TICKET_JS.lines().count(), "one statement changed, nothing else");
        // In a subdirectory too (the page imports it relative to itself).
        assert_eq!(mend("/js/ticket.js", TICKET_JS.as_bytes().to_vec()), served.as_bytes());
    }

    #[test]
    fn other_files_and_unknown_ticket_code_are_served_as_read() {
        assert_eq!(mend("spiceconn.js", TICKET_JS.as_bytes().to_vec()), TICKET_JS.as_bytes());
        let other = "function rsa_encrypt(rsa, str) { return rsa.encryptPadded(str); }";
        assert_eq!(mend("ticket.js", other.as_bytes().to_vec()), other.as_bytes());
        let twice = format!("{TICKET_JS}{LOSSY}");
        assert_eq!(mend("ticket.js", twice.clone().into_bytes()), twice.as_bytes(), "ambiguous: left alone");
        assert_eq!(mend("ticket.js", vec![0xff, 0xfe]), vec![0xff, 0xfe]);
    }
}
