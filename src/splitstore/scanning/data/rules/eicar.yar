/*
 * The EICAR anti-malware test string, wherever it is in a file (the signature engine
 * recognises the exact test file by its official definition; this finds it embedded).
 * Written in hex so that this file is not itself a test file to antivirus software.
 * `needs` names a part of the string, which later windows must contain to be scanned.
 */

rule EICAR_Test_String
{
    meta:
        category = "test-signature"
        description = "the EICAR anti-malware test string"
        scope = "anywhere"
        needs = "bytes:45494341522D5354414E444152442D414E544956495255532D544553542D46494C45"

    strings:
        $eicar = {
            58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43 29 37 7D 24
            45 49 43 41 52 2D 53 54 41 4E 44 41 52 44 2D 41 4E 54 49 56 49 52 55 53 2D
            54 45 53 54 2D 46 49 4C 45 21 24 48 2B 48 2A
        }

    condition:
        $eicar
}
