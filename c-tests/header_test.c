/* The generated header compiles alone, included twice, as C11 with every
 * warning an error (and as C++ via header_test.cpp), and leaves common
 * names to the host: these would not compile if it defined them as
 * macros. */
#include "livemig.h"
#include "livemig.h"

enum host_names { PAGE, PAGE_SIZE, TARGET_PAGE_SIZE, ZERO, FULL, EOS, CONTINUE, XBZRLE, HOOK, QEMU_VM_EOF };

int main(void)
{
    LivemigHostOps ops = { .version = LIVEMIG_HOST_OPS_VERSION, .size = sizeof(ops) };
    MigrationInfo *info = NULL;
    (void)ops;
    qapi_free_MigrationInfo(info);
    return LIVEMIG_VERSION_MAJOR < 0;
}
