package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"k8s.io/component-base/metrics/legacyregistry"
	"k8s.io/klog/v2"
	kubeletmetrics "k8s.io/kubernetes/pkg/kubelet/metrics"
)

// The files under --status-dir, each replaced atomically (temp file + rename) so a
// reader never sees half of one:
//
//	standin.json          written once the stand-in watches pods and plugins
//	registrations.json    every validate/register/deregister of a plugin, in order
//	pods/<pod UID>.json   the latest DRA state of each pod with claims
//	grpc-calls.json       the DRA gRPC calls made, from the kubelet's own metrics
//	health.json           each device's health from the drivers' health streams (health.go)

type standinInfo struct {
	PID         int    `json:"pid"`
	Node        string `json:"node"`
	DRAAPI      string `json:"draAPI"`
	RegistryDir string `json:"registryDir"`
	StateDir    string `json:"stateDir"`
}

type registrationEvent struct {
	Time       time.Time `json:"time"`
	Event      string    `json:"event"`
	Driver     string    `json:"driver"`
	Endpoint   string    `json:"endpoint"`
	Advertised []string  `json:"advertised,omitempty"`
	Offered    []string  `json:"offered,omitempty"`
	Error      string    `json:"error,omitempty"`
}

// Pod states.
const (
	statePrepared        = "prepared"
	statePrepareFailed   = "prepare-failed"
	stateUnprepared      = "unprepared"
	stateUnprepareFailed = "unprepare-failed"
)

type podStatus struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	State     string `json:"state"`
	Error     string `json:"error,omitempty"`
	// Containers: the CDI device ids the kubelet hands the runtime per container.
	Containers map[string][]string `json:"containers,omitempty"`
	Claims     []claimStatus       `json:"claims,omitempty"`
}

type claimStatus struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	// Drivers: what each driver's NodePrepareResources returned for the claim.
	Drivers map[string][]deviceStatus `json:"drivers"`
}

type deviceStatus struct {
	Pool         string   `json:"pool"`
	Device       string   `json:"device"`
	Requests     []string `json:"requests,omitempty"`
	CDIDeviceIDs []string `json:"cdiDeviceIDs,omitempty"`
	ShareID      string   `json:"shareID,omitempty"`
}

type grpcCall struct {
	Driver string `json:"driver"`
	Method string `json:"method"`
	Code   string `json:"code"`
	Count  uint64 `json:"count"`
}

type statusDir struct {
	dir           string
	mu            sync.Mutex
	registrations []registrationEvent
}

var registerMetrics sync.Once

func newStatusDir(dir string) (*statusDir, error) {
	if err := os.MkdirAll(filepath.Join(dir, "pods"), 0o750); err != nil {
		return nil, err
	}
	registerMetrics.Do(func() {
		legacyregistry.MustRegister(kubeletmetrics.DRAGRPCOperationsDuration)
	})
	return &statusDir{dir: dir}, nil
}

func (s *statusDir) standin(info standinInfo) {
	s.write("standin.json", info)
}

func (s *statusDir) registration(event registrationEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	event.Time = time.Now().UTC()
	s.registrations = append(s.registrations, event)
	s.write("registrations.json", s.registrations)
}

func (s *statusDir) pod(status podStatus) {
	s.write(filepath.Join("pods", status.UID+".json"), status)
}

// grpcCalls writes the DRA gRPC calls counted by the kubelet's metrics interceptor,
// which names each by its full method, e.g.
// /k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources.
func (s *statusDir) grpcCalls() {
	families, err := legacyregistry.DefaultGatherer.Gather()
	if err != nil {
		klog.ErrorS(err, "Gathering the DRA gRPC metrics")
		return
	}
	calls := []grpcCall{}
	for _, family := range families {
		if family.GetName() != kubeletmetrics.DRASubsystem+"_"+kubeletmetrics.DRAGRPCOperationsDurationKey {
			continue
		}
		for _, metric := range family.GetMetric() {
			call := grpcCall{Count: metric.GetHistogram().GetSampleCount()}
			for _, label := range metric.GetLabel() {
				switch label.GetName() {
				case "driver_name":
					call.Driver = label.GetValue()
				case "method_name":
					call.Method = label.GetValue()
				case "grpc_status_code":
					call.Code = label.GetValue()
				}
			}
			calls = append(calls, call)
		}
	}
	sort.Slice(calls, func(i, j int) bool {
		a, b := calls[i], calls[j]
		return a.Driver+a.Method+a.Code < b.Driver+b.Method+b.Code
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	s.write("grpc-calls.json", calls)
}

// write replaces dir/name with v as JSON; a failure is logged, never fatal: the status
// files are a report, the kubelet's work goes on without them.
func (s *statusDir) write(name string, v any) {
	if err := writeJSON(filepath.Join(s.dir, name), v); err != nil {
		klog.ErrorS(err, "Writing status file", "file", name)
	}
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone after the rename
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close() //nolint:errcheck // the write error is the one to report
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return nil
}
