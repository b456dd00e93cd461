package main

import (
	"context"
	"slices"
	"sync"
	"time"

	drahealthv1alpha1 "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1"
	drapbv1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// knownServices is, per emulated kubelet, the gRPC services from a plugin's
// supported_versions that it understands; nil means all that the v1.37.2 code knows.
// A 1.32/1.33 kubelet knew v1beta1.DRAPlugin (and the alpha health service) only, so
// hiding the rest from the 1.37 DRA manager makes it negotiate exactly what such a
// kubelet negotiated, and then call the plugin through the generated v1beta1 client.
var knownServices = map[string][]string{
	"v1":      nil,
	"v1beta1": {drapbv1beta1.DRAPluginService, drahealthv1alpha1.DRAResourceHealthService},
}

// registrationHandler sits between the kubelet's plugin manager and the kubelet's DRA
// registration handler: it passes every call through (narrowing supported_versions for
// an older kubelet), records what happened, and tells when the awaited driver is in.
type registrationHandler struct {
	kubelet    cache.PluginHandler
	known      []string
	status     *statusDir
	driver     string
	registered chan struct{}
	once       sync.Once
	health     *healthCache
}

var _ cache.PluginHandler = &registrationHandler{}

func newRegistrationHandler(kubelet cache.PluginHandler, known []string, status *statusDir, driver string, health *healthCache) *registrationHandler {
	h := &registrationHandler{kubelet: kubelet, known: known, status: status, driver: driver,
		registered: make(chan struct{}), health: health}
	if driver == "" {
		close(h.registered)
	}
	return h
}

// offered is what the emulated kubelet understands of what the plugin advertised,
// in the plugin's order.
func (h *registrationHandler) offered(advertised []string) []string {
	if h.known == nil {
		return advertised
	}
	var keep []string
	for _, service := range advertised {
		if slices.Contains(h.known, service) {
			keep = append(keep, service)
		}
	}
	return keep
}

func (h *registrationHandler) ValidatePlugin(ctx context.Context, name, endpoint string, versions []string) error {
	offered := h.offered(versions)
	err := h.kubelet.ValidatePlugin(ctx, name, endpoint, offered)
	h.record("validate", name, endpoint, versions, offered, err)
	return err
}

func (h *registrationHandler) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	offered := h.offered(versions)
	err := h.kubelet.RegisterPlugin(ctx, name, endpoint, offered, timeout)
	h.record("register", name, endpoint, versions, offered, err)
	if err == nil {
		h.health.watch(name, endpoint, offered)
	}
	if err == nil && name == h.driver {
		h.once.Do(func() { close(h.registered) })
	}
	return err
}

func (h *registrationHandler) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	h.kubelet.DeRegisterPlugin(ctx, name, endpoint)
	h.health.unwatch(endpoint)
	h.record("deregister", name, endpoint, nil, nil, nil)
}

func (h *registrationHandler) record(event, name, endpoint string, advertised, offered []string, err error) {
	h.status.registration(registrationEvent{
		Event: event, Driver: name, Endpoint: endpoint,
		Advertised: advertised, Offered: offered, Error: errorText(err),
	})
}

func errorText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
