// The generated header compiles as C++ too, included twice.
#include "livemig.h"
#include "livemig.h"

int main()
{
    LivemigHostOps ops = {};
    ops.version = LIVEMIG_HOST_OPS_VERSION;
    MigrationStatus st = MIGRATION_STATUS_COMPLETED;
    return st == MIGRATION_STATUS_NONE || ops.version == 0;
}
