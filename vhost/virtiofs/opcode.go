package virtiofs

import (
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// FUSE opcodes (include/uapi/linux/fuse.h). go-fuse does not export them;
// the numbers are the protocol's.
const (
	OpLookup        uint32 = 1
	OpForget        uint32 = 2
	OpGetAttr       uint32 = 3
	OpSetAttr       uint32 = 4
	OpReadlink      uint32 = 5
	OpSymlink       uint32 = 6
	OpMknod         uint32 = 8
	OpMkdir         uint32 = 9
	OpUnlink        uint32 = 10
	OpRmdir         uint32 = 11
	OpRename        uint32 = 12
	OpLink          uint32 = 13
	OpOpen          uint32 = 14
	OpRead          uint32 = 15
	OpWrite         uint32 = 16
	OpStatFS        uint32 = 17
	OpRelease       uint32 = 18
	OpFsync         uint32 = 20
	OpSetXAttr      uint32 = 21
	OpGetXAttr      uint32 = 22
	OpListXAttr     uint32 = 23
	OpRemoveXAttr   uint32 = 24
	OpFlush         uint32 = 25
	OpInit          uint32 = 26
	OpOpenDir       uint32 = 27
	OpReadDir       uint32 = 28
	OpReleaseDir    uint32 = 29
	OpFsyncDir      uint32 = 30
	OpGetLk         uint32 = 31
	OpSetLk         uint32 = 32
	OpSetLkW        uint32 = 33
	OpAccess        uint32 = 34
	OpCreate        uint32 = 35
	OpInterrupt     uint32 = 36
	OpBmap          uint32 = 37
	OpDestroy       uint32 = 38
	OpIoctl         uint32 = 39
	OpPoll          uint32 = 40
	OpNotifyReply   uint32 = 41
	OpBatchForget   uint32 = 42
	OpFallocate     uint32 = 43
	OpReadDirPlus   uint32 = 44
	OpRename2       uint32 = 45
	OpLseek         uint32 = 46
	OpCopyFileRange uint32 = 47
	OpSetupMapping  uint32 = 48
	OpRemoveMapping uint32 = 49
	OpSyncFS        uint32 = 50
	OpTmpfile       uint32 = 51
	OpStatx         uint32 = 52
)

// Protocol sizes.
const (
	InHeaderSize  = 40 // struct fuse_in_header
	OutHeaderSize = 16 // struct fuse_out_header
	// maxArgs bounds the fixed part (header and opcode struct) of every
	// request the device passes on; the largest is fuse_setattr_in (128).
	maxArgs = 128

	fuseMajor    = 7  // FUSE_KERNEL_VERSION
	fuseMinMinor = 12 // the oldest minor go-fuse serves

	batchForgetInSize  = InHeaderSize + 8
	pollInSize         = InHeaderSize + 24
	renameCompatInSize = InHeaderSize + 8 // fuse_rename_in without flags
	setXAttrCompatSize = InHeaderSize + 8 // FUSE_COMPAT_SETXATTR_IN_SIZE
	initCompatInSize   = InHeaderSize + 16
)

func size[T any]() int {
	var v T
	return int(unsafe.Sizeof(v))
}

// argSize is the size of the header and fixed arguments of every opcode
// the device passes to go-fuse: a request shorter than that is refused
// before go-fuse sees it (go-fuse would report it on the process-wide
// logger). Opcodes missing here are answered ENOSYS by the device. RENAME
// and SETXATTR depend on what FUSE_INIT negotiated (argLen).
var argSize = map[uint32]int{
	OpLookup:        InHeaderSize,
	OpForget:        size[fuse.ForgetIn](),
	OpGetAttr:       size[fuse.GetAttrIn](),
	OpSetAttr:       size[fuse.SetAttrIn](),
	OpReadlink:      InHeaderSize,
	OpSymlink:       InHeaderSize,
	OpMknod:         size[fuse.MknodIn](),
	OpMkdir:         size[fuse.MkdirIn](),
	OpUnlink:        InHeaderSize,
	OpRmdir:         InHeaderSize,
	OpRename:        renameCompatInSize,
	OpLink:          size[fuse.LinkIn](),
	OpOpen:          size[fuse.OpenIn](),
	OpRead:          size[fuse.ReadIn](),
	OpWrite:         size[fuse.WriteIn](),
	OpStatFS:        InHeaderSize,
	OpRelease:       size[fuse.ReleaseIn](),
	OpFsync:         size[fuse.FsyncIn](),
	OpSetXAttr:      setXAttrCompatSize,
	OpGetXAttr:      size[fuse.GetXAttrIn](),
	OpListXAttr:     size[fuse.GetXAttrIn](),
	OpRemoveXAttr:   InHeaderSize,
	OpFlush:         size[fuse.FlushIn](),
	OpInit:          initCompatInSize,
	OpOpenDir:       size[fuse.OpenIn](),
	OpReadDir:       size[fuse.ReadIn](),
	OpReleaseDir:    size[fuse.ReleaseIn](),
	OpFsyncDir:      size[fuse.FsyncIn](),
	OpGetLk:         size[fuse.LkIn](),
	OpSetLk:         size[fuse.LkIn](),
	OpSetLkW:        size[fuse.LkIn](),
	OpAccess:        size[fuse.AccessIn](),
	OpCreate:        size[fuse.CreateIn](),
	OpInterrupt:     size[fuse.InterruptIn](),
	OpDestroy:       InHeaderSize,
	OpIoctl:         size[fuse.IoctlIn](),
	OpPoll:          pollInSize,
	OpBatchForget:   batchForgetInSize,
	OpFallocate:     size[fuse.FallocateIn](),
	OpReadDirPlus:   size[fuse.ReadIn](),
	OpRename2:       size[fuse.RenameIn](),
	OpLseek:         size[fuse.LseekIn](),
	OpCopyFileRange: size[fuse.CopyFileRangeIn](),
	OpTmpfile:       size[fuse.CreateIn](),
	OpStatx:         size[fuse.StatxIn](),
}

// noReply reports the opcodes the driver expects no reply for: their
// chains may have no writable part.
func noReply(op uint32) bool { return op == OpForget || op == OpBatchForget }

// hiprioOp reports the opcodes the hiprio queue carries (virtio 1.2 §5.11.6.1).
func hiprioOp(op uint32) bool {
	return op == OpForget || op == OpBatchForget || op == OpInterrupt
}
