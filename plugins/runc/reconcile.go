package runc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// runcContainer is an entry of `runc list`.
type runcContainer struct {
	ID     string `json:"id"`
	Bundle string `json:"bundle"`
	Status string `json:"status"`
}

// list returns the containers in runc's state directory.
func (r *runcCLI) list(ctx context.Context) ([]runcContainer, error) {
	out, err := r.run(ctx, nil, "list", "--format", "json")
	if err != nil {
		return nil, err
	}
	var cs []runcContainer
	if err := json.Unmarshal(out, &cs); err != nil {
		return nil, fmt.Errorf("decoding runc list: %w", err)
	}
	return cs, nil
}

// systemdManaged reports whether runc made a container's cgroups through
// systemd (its delete needs --systemd-cgroup).
func (r *runcCLI) systemdManaged(id string) bool {
	b, err := os.ReadFile(filepath.Join(r.root, id, "state.json"))
	if err != nil {
		return false
	}
	var st struct {
		Config struct {
			Cgroups struct {
				Systemd bool `json:"systemd"`
			} `json:"cgroups"`
		} `json:"config"`
	}
	return json.Unmarshal(b, &st) == nil && st.Config.Cgroups.Systemd
}

// Reconcile removes what a daemon killed in the middle of an operation
// left of kuasar-runc without a record: runc containers no record owns (a
// container created but not recorded yet, the PID-namespace holder of a
// pod whose creation never finished) with their processes, cgroups and
// rootfs mounts, and the streams the keeper holds for processes no
// recovered container owns (those of execs, whose sessions ended with the
// daemon).
func (k *kind) Reconcile(ctx context.Context, owned sandbox.Owned) error {
	known := map[string]bool{}
	keys := map[string]bool{}
	for _, sb := range owned.Sandboxes {
		known[holderID(sb.ID)] = true
		for _, c := range owned.Containers[sb.ID] {
			known[c.ID] = true
			if c.Init.Status() != tasktypes.Status_STOPPED {
				keys[ioKey(c.Init)] = true
			}
		}
	}
	var errs []error
	if rc, err := k.runc(); err == nil {
		cs, err := rc.list(ctx)
		if err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, err)
		}
		listed := map[string]bool{}
		for _, c := range cs {
			listed[c.ID] = true
			if known[c.ID] {
				continue
			}
			log.G(ctx).WithField("container", c.ID).WithField("status", c.Status).Warn("removing a runc container no record owns (left by a daemon that was killed)")
			rcc := rc.forContainer(ctrState{Systemd: rc.systemdManaged(c.ID)})
			if _, err := rcc.run(ctx, nil, "delete", "--force", c.ID); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, err)
				continue
			}
			if c.Bundle != "" {
				if err := mount.UnmountAll(filepath.Join(c.Bundle, "rootfs"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
					errs = append(errs, fmt.Errorf("unmounting the rootfs of %s: %w", c.ID, err))
				}
			}
		}
		// A runc create killed before it wrote its state leaves a directory
		// runc itself no longer lists (its init ended with it).
		entries, _ := os.ReadDir(rc.root)
		for _, e := range entries {
			if !e.IsDir() || listed[e.Name()] || known[e.Name()] {
				continue
			}
			if _, err := os.Stat(filepath.Join(rc.root, e.Name(), "state.json")); err == nil {
				continue
			}
			log.G(ctx).WithField("container", e.Name()).Warn("removing what a runc create interrupted by a kill left")
			if err := os.RemoveAll(filepath.Join(rc.root, e.Name())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(owned.Sandboxes) > 0 || len(known) > 0 {
		held, err := k.env.Monitor.ListIO(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing the streams the keeper holds: %w", err))
		}
		for _, key := range held {
			if strings.HasPrefix(key, ioKeyPrefix) && !keys[key] {
				log.G(ctx).WithField("key", key).Info("releasing streams no recovered process owns")
				if err := k.env.Monitor.ReleaseIO(ctx, key, false); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}
