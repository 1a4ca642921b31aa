package vmm

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"

	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// Reconcile ends what a daemon killed in the middle of starting a pod (or
// of building a template) left running without a record: a VM whose run
// directory no recorded pod owns.
func (k *kind) Reconcile(ctx context.Context, owned sandbox.Owned) error {
	mine := map[string]bool{}
	for _, sb := range owned.Sandboxes {
		var st podState
		if json.Unmarshal(sb.State, &st) == nil && st.RunDir != "" {
			mine[st.RunDir] = true
		}
	}
	entries, err := os.ReadDir(k.runDirs)
	if err != nil {
		return nil
	}
	for _, e := range entries {
		dir := filepath.Join(k.runDirs, e.Name())
		if !e.IsDir() || mine[dir] {
			continue
		}
		log.G(ctx).WithField("run", dir).Warn("ending a VM no record owns (left by a daemon that was killed)")
		killVMIn(ctx, dir)
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("run", dir).Warn("removing a VM's run directory")
		}
	}
	return nil
}
