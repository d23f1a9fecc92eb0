/* Wine 8.0 lacks bcryptprimitives.dll, whose ProcessPrng Rust's standard library (1.78+) imports
 * for randomness, so no Rust program starts under it. This stand-in exports ProcessPrng on top of
 * advapi32's RtlGenRandom (SystemFunction036). It is part of the Wine test set-up only: Windows
 * has the real DLL, and nothing that ships contains this. */
#include <windows.h>

BOOLEAN NTAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
