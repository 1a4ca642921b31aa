package qemu

import (
	"context"
	"fmt"
	"os"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/qemu/qmp"
)

// Snapshots: the template path of kuasar-vmm. A template is a VM booted
// once (to the point where its agent waits for a pod) with its RAM in a
// shared file (hypervisor.MemoryFile, Share) and saved with Save; each pod
// VM is a clone: started with Incoming and the same RAM file mapped
// private (Share false: copy-on-write pages of the template), restored
// with Restore. With ignoreShared (QEMU's x-ignore-shared) the state
// leaves the shared RAM out: tens of kB instead of the whole RAM, which
// the clone maps from the file. The state travels through a file the
// daemon opens and hands over QMP (fd: URIs), so QEMU needs no right to
// start processes.

// migrationFD is the name the state file gets in QEMU.
const migrationFD = "kuasar-migration"

// Save pauses the VM and writes its state to f (opened for writing). The
// VM stays paused (QEMU's postmigrate state); quit it once saved.
func (vm *VM) Save(ctx context.Context, f *os.File, ignoreShared bool) error {
	if err := vm.qmp.Stop(ctx); err != nil {
		return err
	}
	return vm.migrate(ctx, f, ignoreShared, vm.qmp.Migrate)
}

// Restore loads the state in f (opened for reading) into a VM started
// with Incoming, and resumes it.
func (vm *VM) Restore(ctx context.Context, f *os.File, ignoreShared bool) error {
	if err := vm.migrate(ctx, f, ignoreShared, vm.qmp.MigrateIncoming); err != nil {
		return err
	}
	return vm.qmp.Cont(ctx)
}

func (vm *VM) migrate(ctx context.Context, f *os.File, ignoreShared bool, start func(context.Context, string) error) error {
	if ignoreShared {
		if err := vm.qmp.MigrateSetCapabilities(ctx, qmp.Capability{Capability: "x-ignore-shared", State: true}); err != nil {
			return err
		}
	}
	if err := vm.qmp.GetFD(ctx, migrationFD, int(f.Fd())); err != nil {
		return fmt.Errorf("passing the state file: %w", err)
	}
	err := vm.qmp.RunMigration(ctx, func(ctx context.Context) error { return start(ctx, "fd:"+migrationFD) })
	if err != nil {
		return fmt.Errorf("vm %s: %w", vm.st.ID, err)
	}
	return nil
}
