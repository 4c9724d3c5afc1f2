/*
 * Office documents that carry a VBA macro project.
 *
 * Both rules are "anywhere" rules, because the part that names the project can lie
 * anywhere in a large document: they match the record that names it, not just the name.
 * Beyond the first window they are looked for only in files of their own format (the
 * `needs` meta: the file's magic and the name's bytes), so other big files cost nothing.
 */

rule Office_OOXML_Macros
{
    meta:
        category = "macro"
        description = "an Office Open XML document (docm, xlsm, pptm...) with a VBA project"
        scope = "anywhere"
        needs = "magic:504B0304 bytes:76626150726F6A6563742E62696E"

    strings:
        // A zip local file header (30 bytes, then the name) or central directory header
        // (46 bytes, then the name) of an entry whose name has vbaProject.bin, after a
        // folder of up to 64 bytes ("word/", "xl/", "ppt/"), spelled as Office writes it.
        $local = { 50 4B 03 04 [26-90] 76 62 61 50 72 6F 6A 65 63 74 2E 62 69 6E }
        $central = { 50 4B 01 02 [42-106] 76 62 61 50 72 6F 6A 65 63 74 2E 62 69 6E }

    condition:
        $local or $central
}

rule Office_OLE_Macros
{
    meta:
        category = "macro"
        description = "an Office 97-2003 (OLE compound file) document with a VBA project"
        scope = "anywhere"
        needs = "magic:D0CF11E0A1B11AE1 bytes:5F005600420041005F00500052004F004A00450043005400"

    strings:
        // A compound file directory entry (128 bytes) for the stream "_VBA_PROJECT": the
        // name in UTF-16LE with its terminating NUL, the rest of the 64-byte name field,
        // the name's length in bytes with the NUL (26), and the object type "stream" (2).
        $entry = {
            5F 00 56 00 42 00 41 00 5F 00 50 00 52 00 4F 00 4A 00 45 00 43 00 54 00 00 00
            [38] 1A 00 02
        }

    condition:
        $entry
}
