package wasm

import (
	"context"
	"errors"
	"time"

	"github.com/containerd/log"
	gometrics "github.com/docker/go-metrics"
	"github.com/prometheus/client_golang/prometheus"

	kmetrics "github.com/kuasar-io/containerd-kuasar/plugins/metrics"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// statsTimeout bounds the Wasm host's answer to a scrape.
const statsTimeout = 2 * time.Second

var errNoHostYet = errors.New("no Wasm host reached yet")

// addMetrics exports kuasar_wasm_host_*: the node's Wasm host's figures,
// asked at each scrape of a host that runs (a scrape never starts one;
// without a host every figure is 0).
func (k *kind) addMetrics(m *kmetrics.Controller) {
	if m == nil {
		return
	}
	up := m.Desc("wasm_host_up", "1 while the node's Wasm host answers the daemon", "")
	instances := m.Desc("wasm_host_instances", "Module instances running in the Wasm host (containers' and execs')", "")
	modules := m.Desc("wasm_host_compiled_modules", "Compiled modules the Wasm host holds in memory (in use, and the last unused ones it keeps)", "")
	compiling := m.Desc("wasm_host_compiling_modules", "Modules the Wasm host is compiling now", "")
	linear := m.Desc("wasm_host_linear_memory", "Linear memory of every module instance of the Wasm host", gometrics.Bytes)
	resident := m.Desc("wasm_host_resident_memory", "Resident memory of the Wasm host process (its instances' linear memory and compiled code included)", gometrics.Bytes)
	files := m.Desc("wasm_host_open_files", "Files the Wasm host's modules hold open", "")
	m.Add(kmetrics.NewGauges(func(emit func(*prometheus.Desc, float64, ...string)) {
		ctx, cancel := context.WithTimeout(context.Background(), statsTimeout)
		defer cancel()
		// A daemon that never reached a host (none was needed since it
		// started) does not dial one for a scrape: that would wait for a
		// host being started by a pod meanwhile.
		st, err := &api.HostStatsResponse{}, errNoHostYet
		if k.host.Boot() != "" {
			st, err = k.host.HostStats(ctx)
		}
		if err != nil {
			log.G(ctx).WithError(err).Debug("no Wasm host figures for this scrape")
			st = &api.HostStatsResponse{}
		}
		ok := 0.0
		if err == nil {
			ok = 1
		}
		emit(up, ok)
		emit(instances, float64(st.GetInstances()))
		emit(modules, float64(st.GetModules()))
		emit(compiling, float64(st.GetCompiling()))
		emit(linear, float64(st.GetLinearMemoryBytes()))
		emit(resident, float64(st.GetResidentMemoryBytes()))
		emit(files, float64(st.GetOpenFiles()))
	}, up, instances, modules, compiling, linear, resident, files))
}
