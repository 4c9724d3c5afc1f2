/*
 * Scripts that fetch code and run it, or hide what they run: PowerShell encoded
 * commands and download cradles, shell "curl | sh" one-liners, certutil and mshta
 * downloads, and WScript.Shell launching programs.
 *
 * Every rule needs the dangerous combination in one command (or, for WScript.Shell, in
 * one window), never a single word: documentation and source code that merely mention
 * these commands must not match. All are "anywhere" rules needing "text": in a text file
 * they are looked for everywhere, in any other file only in its first window (1 MiB).
 *
 * Documentation (by its name: .md, .txt, .html, README...) is never a dropper: READMEs
 * often show "curl ... | sh" or an IEX bootstrap line for a person to copy, and they do
 * not run by themselves.
 *
 * The expressions are kept tight on purpose: no wide gaps such as .{0,300}, which make
 * YARA try every gap length after every keyword. Arguments are matched as a bounded
 * number of space-separated tokens on one line, so that a hostile file repeating a
 * keyword costs little per repetition (and a YARA time-out bounds the rest).
 */

private rule Documentation_Name
{
    condition:
        extension matches /^(md|markdown|mdown|rst|txt|text|adoc|asciidoc|org|tex|texi|texinfo|info|html?|xhtml|pdf|epub|rtf)$/
        // READMEs, and a Python package's description (METADATA, PKG-INFO), by name; in
        // capitals, as a lower-case "install" may well be a script.
        or filename matches /^(README|Readme|readme|INSTALL|NEWS|CHANGES|CHANGELOG|HISTORY|METADATA|PKG-INFO)$/
}

rule PowerShell_Encoded_Command
{
    meta:
        category = "script-dropper"
        description = "PowerShell run with a base64-encoded command"
        scope = "anywhere"
        needs = "text"

    strings:
        // powershell/pwsh, up to 6 other arguments (-nop, -w hidden...), then any
        // abbreviation PowerShell accepts of -EncodedCommand (-e, -ec, -enc...), then at
        // least 40 base64 characters.
        $ps = /\b(powershell|pwsh)(\.exe)?["']?([ \t]+[^\s|;&<>]+){0,6}[ \t]+[-\/](e|ec|en|enc|enco|encod|encode|encoded|encodedc|encodedco|encodedcom|encodedcomm|encodedcomma|encodedcomman|encodedcommand)[ \t]+["']?[a-z0-9+\/]{40}/ nocase
        // The unambiguous spellings without the program's name, with a longer argument.
        $enc = /[ \t][-\/](enc|encodedcommand)[ \t]+["']?[a-z0-9+\/]{100}/ nocase

    condition:
        not Documentation_Name and ($ps or $enc)
}

rule PowerShell_Download_Execute
{
    meta:
        category = "script-dropper"
        description = "PowerShell downloading code and running it (IEX download cradle)"
        scope = "anywhere"
        needs = "text"

    strings:
        // IEX (New-Object Net.WebClient)..., IEX (iwr ...), Invoke-Expression $(irm ...)
        $iex_call = /\b(iex|invoke-expression)[ \t]*(-command[ \t]*)?\$?\(+[ \t]*(new-object[ \t]+(-typename[ \t]+)?(system\.)?net\.webclient\b|\(?[ \t]*(iwr|irm|invoke-webrequest|invoke-restmethod|start-bitstransfer)[ \t])/ nocase
        // (...).DownloadString('http://...') | IEX, or DownloadString($url) | IEX
        $dl_pipe = /\.download(string|data)[ \t]*\([ \t]*(['"]https?:\/\/[^'"\s]+['"]|\$[a-z_][a-z0-9_]*)[ \t]*\)+[ \t]*\|[ \t]*(iex|invoke-expression)\b/ nocase
        // iwr url | iex, irm url -UseBasicParsing | iex (up to 6 more tokens)
        $web_pipe = /\b(iwr|irm|invoke-webrequest|invoke-restmethod)([ \t]+[^\s|;]+){1,6}[ \t]*\|[ \t]*(iex|invoke-expression)\b/ nocase

    condition:
        not Documentation_Name and any of ($*)
}

rule Shell_Download_Execute
{
    meta:
        category = "script-dropper"
        description = "a shell one-liner piping a download into a shell (curl | sh)"
        scope = "anywhere"
        needs = "text"

    strings:
        // curl or wget with up to 8 arguments, piped into sh, bash, zsh... (optionally
        // through sudo). wget needs -O- to write to the pipe, but without it the line
        // still says what was meant.
        $fetch = /\b(curl|wget)([ \t]+[^\s|;&<>]+){1,8}[ \t]*\|[ \t]*(sudo([ \t]+-[a-zA-Z]+)*[ \t]+)?(ba|da|k|z|fi|c|tc)?sh\b/

    condition:
        not Documentation_Name and $fetch
}

rule Windows_LOLBin_Download
{
    meta:
        category = "script-dropper"
        description = "a Windows system tool used to download or run remote code (certutil, mshta)"
        scope = "anywhere"
        needs = "text"

    strings:
        // certutil -urlcache ... -f, in either order, the classic download trick.
        $certutil_a = /\bcertutil(\.exe)?["']?([ \t]+[-\/][a-z]+){0,4}[ \t]+[-\/]urlcache([ \t]+[-\/][a-z]+){0,4}[ \t]+[-\/]f\b/ nocase
        $certutil_b = /\bcertutil(\.exe)?["']?([ \t]+[-\/][a-z]+){0,4}[ \t]+[-\/]f([ \t]+[-\/][a-z]+){0,4}[ \t]+[-\/]urlcache\b/ nocase
        // mshta with a remote page or an inline script.
        $mshta = /\bmshta(\.exe)?["']?[ \t]+["']?(https?:\/\/|vbscript:|javascript:)/ nocase

    condition:
        not Documentation_Name and any of ($*)
}

rule WScript_Shell_Run
{
    meta:
        category = "script-dropper"
        description = "a script that creates WScript.Shell and runs programs with it"
        scope = "anywhere"
        needs = "text"

    strings:
        $create = /\b(createobject|activexobject)\s*\(\s*["']wscript\.shell["']\s*\)/ nocase
        $run = /\.(run|exec)\b[ \t]*[("a-z]/ nocase

    condition:
        not Documentation_Name and ($create and $run)
}
