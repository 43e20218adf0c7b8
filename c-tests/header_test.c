/* The generated header compiles alone, included twice, as C11 with every
 * warning an error (and as C++ via header_test.cpp). */
#include "livemig.h"
#include "livemig.h"

int main(void)
{
    LivemigHostOps ops = { .version = LIVEMIG_HOST_OPS_VERSION, .size = sizeof(ops) };
    MigrationInfo *info = NULL;
    (void)ops;
    qapi_free_MigrationInfo(info);
    return LIVEMIG_VERSION_MAJOR < 0;
}
