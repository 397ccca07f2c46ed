/* registry.c -- knhk_registry: workflow patterns by number, one indexed load.
 *
 * Pattern numbers are small and dense (1..43 for the control-flow patterns),
 * so the table is a direct-indexed array of records: a lookup is a bounds
 * check and one load, no hashing. Writers are serialised by the Python layer
 * (and the table is frozen before the engine starts); the frozen flag is
 * atomic so a late writer is refused, not raced.
 */
#include <stdio.h>
#include <stdlib.h>

#include "knhk_internal.h"

struct knhk_registry {
    uint32_t max_id;
    uint32_t count;
    int frozen; /* atomic */
    knhk_pattern *slots; /* [max_id + 1]; slot 0 unused, a name of NULL marks a free slot */
};

knhk_registry *knhk_registry_new(uint32_t max_id, int *status) {
    int dummy;
    if (status == NULL) status = &dummy;
    if (max_id < 1 || max_id > KNHK_REGISTRY_MAX_ID) {
        _knhk_set_error("knhk_registry_new: max_id %u is not in [1, %d]", max_id, KNHK_REGISTRY_MAX_ID);
        *status = KNHK_ERR_INVALID;
        return NULL;
    }
    knhk_registry *r = calloc(1, sizeof *r);
    knhk_pattern *slots = calloc((size_t)max_id + 1, sizeof *slots);
    if (r == NULL || slots == NULL) {
        free(r);
        free(slots);
        _knhk_set_error("knhk_registry_new: out of memory for %u slots", max_id + 1);
        *status = KNHK_ERR_NOMEM;
        return NULL;
    }
    r->max_id = max_id;
    r->slots = slots;
    *status = KNHK_OK;
    return r;
}

void knhk_registry_free(knhk_registry *r) {
    if (r == NULL) return;
    for (uint32_t i = 0; i <= r->max_id; i++) free((void *)r->slots[i].name);
    free(r->slots);
    free(r);
}

static int check_writable(const knhk_registry *r, const char *what) {
    if (__atomic_load_n(&r->frozen, __ATOMIC_ACQUIRE)) {
        _knhk_set_error("%s: the registry is frozen (the engine has started)", what);
        return KNHK_ERR_STATE;
    }
    return KNHK_OK;
}

int knhk_registry_put(knhk_registry *r, uint32_t id, uint32_t group, const char *name) {
    int rc = check_writable(r, "knhk_registry_put");
    if (rc != KNHK_OK) return rc;
    if (id < 1 || id > r->max_id) {
        _knhk_set_error("knhk_registry_put: pattern id %u is not in [1, %u]", id, r->max_id);
        return KNHK_ERR_INVALID;
    }
    if (name == NULL) {
        _knhk_set_error("knhk_registry_put: pattern %u has a NULL name", id);
        return KNHK_ERR_INVALID;
    }
    if (r->slots[id].name != NULL) {
        _knhk_set_error("knhk_registry_put: pattern id %u is already taken by '%s'", id, r->slots[id].name);
        return KNHK_ERR_STATE;
    }
    size_t n = strlen(name) + 1;
    char *copy = malloc(n);
    if (copy == NULL) {
        _knhk_set_error("knhk_registry_put: out of memory for the name of pattern %u", id);
        return KNHK_ERR_NOMEM;
    }
    memcpy(copy, name, n);
    r->slots[id] = (knhk_pattern){.id = id, .group = group, .name = copy, .executor = 0};
    r->count++;
    return KNHK_OK;
}

int knhk_registry_set_executor(knhk_registry *r, uint32_t id, uint64_t executor) {
    int rc = check_writable(r, "knhk_registry_set_executor");
    if (rc != KNHK_OK) return rc;
    if (id < 1 || id > r->max_id || r->slots[id].name == NULL) {
        _knhk_set_error("knhk_registry_set_executor: no pattern numbered %u", id);
        return KNHK_ERR_INVALID;
    }
    r->slots[id].executor = executor;
    return KNHK_OK;
}

void knhk_registry_freeze(knhk_registry *r) { __atomic_store_n(&r->frozen, 1, __ATOMIC_RELEASE); }

int knhk_registry_is_frozen(const knhk_registry *r) { return __atomic_load_n(&r->frozen, __ATOMIC_ACQUIRE); }

uint32_t knhk_registry_count(const knhk_registry *r) { return r->count; }

static inline const knhk_pattern *lookup(const knhk_registry *r, uint32_t id) {
    /* id - 1 wraps 0 to UINT32_MAX, so one unsigned compare rejects 0 and > max_id. */
    if (_knhk_unlikely(id - 1 >= r->max_id)) return NULL;
    const knhk_pattern *p = &r->slots[id];
    return p->name != NULL ? p : NULL;
}

const knhk_pattern *knhk_registry_lookup(const knhk_registry *r, uint32_t id) { return lookup(r, id); }

void knhk_registry_hotop_lookup(void *ctx, uint64_t iterations) {
    const knhk_registry *r = ctx;
    uint32_t id = 1;
    uint64_t sink = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        const knhk_pattern *p = lookup(r, id);
        sink += p != NULL ? p->executor + p->group : 0;
        id = id == r->max_id ? 1 : id + 1;
        __asm__ volatile("" : "+r"(sink) : : "memory");
    }
    __asm__ volatile("" : : "r"(sink));
}
