package task

import (
	"fmt"

	"github.com/containerd/containerd/v2/core/mount"
)

// MountRootfs mounts the container's rootfs mounts (those containerd
// hands the task, Rootfs) at target, which must exist.
func (c *Container) MountRootfs(target string) error {
	ms := make([]mount.Mount, 0, len(c.Rootfs))
	for _, m := range c.Rootfs {
		ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	if err := mount.All(ms, target); err != nil {
		return fmt.Errorf("mounting rootfs: %w", err)
	}
	return nil
}
