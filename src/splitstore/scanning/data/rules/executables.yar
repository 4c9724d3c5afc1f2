/*
 * Programs: PE (Windows), ELF (Linux, BSD), Mach-O (macOS; thin and universal), and a
 * program under a name that claims a document, picture, sound, video or text.
 *
 * All are "head" rules: their conditions read fixed offsets of the file's first window.
 * The externals `extension` (the name's last extension, lower case, no dot, "" if none)
 * and `filename` (the base name) come from the engine.
 */

rule PE_Executable
{
    meta:
        category = "executable"
        description = "a Windows program or library (PE: MZ header and PE signature)"
        scope = "head"

    condition:
        // "MZ", and "PE\0\0" where the DOS header's e_lfanew points.
        uint16(0) == 0x5A4D and uint32(uint32(0x3C)) == 0x00004550
}

rule ELF_Executable
{
    meta:
        category = "executable"
        description = "an ELF program or shared library"
        scope = "head"

    condition:
        // "\x7FELF", a valid class (32/64-bit) and version, and e_type EXEC or DYN (not
        // object files or core dumps), read in the file's own byte order.
        uint32(0) == 0x464C457F
        and (uint8(4) == 1 or uint8(4) == 2)
        and uint8(6) == 1
        and (
            (uint8(5) == 1 and (uint16(16) == 2 or uint16(16) == 3))
            or (uint8(5) == 2 and (uint16be(16) == 2 or uint16be(16) == 3))
        )
}

rule MachO_Executable
{
    meta:
        category = "executable"
        description = "a Mach-O program or library (32 or 64-bit, either byte order)"
        scope = "head"

    condition:
        // Magic FEEDFACE / FEEDFACF in either byte order, and a file type of program (2),
        // dynamic linker (7), library (6) or bundle (8), read in the file's byte order.
        (
            (uint32(0) == 0xFEEDFACE or uint32(0) == 0xFEEDFACF)
            and (uint32(12) == 2 or uint32(12) == 6 or uint32(12) == 7 or uint32(12) == 8)
        )
        or (
            (uint32be(0) == 0xFEEDFACE or uint32be(0) == 0xFEEDFACF)
            and (uint32be(12) == 2 or uint32be(12) == 6 or uint32be(12) == 7 or uint32be(12) == 8)
        )
}

rule MachO_Universal_Binary
{
    meta:
        category = "executable"
        description = "a Mach-O universal (fat) binary"
        scope = "head"

    condition:
        // CAFEBABE (or CAFEBABF for 64-bit offsets), big-endian. Java class files start
        // with CAFEBABE too, followed by minor and major version (major >= 45): a fat
        // binary instead has a small architecture count there, and its first entry is a
        // known CPU type (x86 7, ARM 12, PowerPC 18, with or without the 64-bit flags).
        (uint32be(0) == 0xCAFEBABE or uint32be(0) == 0xCAFEBABF)
        and uint32be(4) >= 1 and uint32be(4) <= 30
        and (
            (uint32be(8) & 0x00FFFFFF) == 7
            or (uint32be(8) & 0x00FFFFFF) == 12
            or (uint32be(8) & 0x00FFFFFF) == 18
        )
}

rule Disguised_Executable
{
    meta:
        category = "disguised-executable"
        description = "a program named as a document, picture, sound, video or text file"
        scope = "head"

    condition:
        (PE_Executable or ELF_Executable or MachO_Executable or MachO_Universal_Binary)
        and (
            extension matches /^(pdf|rtf|txt|text|md|csv|tsv|log|json|xml|html?|xhtml|ya?ml|ini|eml|msg|doc|docx|docm|dot|dotx|xls|xlsx|xlsm|xlt|ppt|pptx|pptm|pps|ppsx|odt|ods|odp|odg|pages|numbers|key|epub|jpe?g|jfif|png|gif|bmp|tiff?|webp|svg|ico|heic|heif|avif|psd|raw|cr2|nef|mp3|m4a|aac|wav|flac|ogg|oga|opus|wma|aiff?|mid|midi|mp4|m4v|mkv|mov|avi|wmv|webm|flv|mpe?g|3gp)$/
            // "invoice.pdf.exe": a document's extension right before a program's one.
            or filename matches /\.(pdf|rtf|txt|docx?|xlsx?|pptx?|jpe?g|png|gif|mp3|mp4|mov|avi)[ ._-]*\.(exe|scr|com|pif|cpl|msi|bat|cmd|app|bin|run|elf)$/is
            // A right-to-left override (U+202E) makes "fdp.exe" read as "exe.pdf".
            or filename matches /\xE2\x80\xAE/
        )
}
