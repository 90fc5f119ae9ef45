/* What build.rs hands to bindgen: the libext2fs API and its error codes. */
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <ext2fs/ext2_err.h>
#include <et/com_err.h>
